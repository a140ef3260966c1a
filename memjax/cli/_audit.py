"""``memjax audit``: train, score and attack on bundled data; write the report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from memjax.cli._common import check_out_folder, positive_int
from memjax.errors import InputError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    audit = sub.add_parser("audit", help="train, score and attack on bundled data; write a "
                           "report")
    audit.add_argument("--out", default="memjax-report", help="report folder")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--steps", type=positive_int, default=600, help="training steps")
    audit.add_argument("--references", type=int, default=16,
                       help="reference models for LiRA/RMIA (even; 0 to skip)")
    audit.add_argument("--no-demos", action="store_true", help="leave out the tiny CLIP and "
                       "GPT-2 membership demonstrations and the influence, memorization and "
                       "image-generator sections")
    audit.add_argument("--no-progress", action="store_true")
    audit.set_defaults(run=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from memjax.audit import run_audit

    # Before minutes of training: the report folder must be writable at the end.
    check_out_folder(args.out, "--out")
    if args.references < 0 or args.references % 2:
        raise InputError(f"--references {args.references}: expected an even number >= 0 "
                         "(each example is in half of the reference models; 0 skips them)")
    folder = run_audit(args.out, seed=args.seed, steps=args.steps,
                       progress=not args.no_progress, references=args.references,
                       demos=not args.no_demos)
    metrics = json.loads((folder / "metrics.json").read_text())
    attack = metrics["Membership inference: LOSS attack"]
    print(f"report: {folder / 'index.html'}")
    print(f"LOSS attack: AUC {attack['AUC']:.4f}, TPR@1%FPR {attack['TPR@1%FPR']:.4f}")
    return 0
