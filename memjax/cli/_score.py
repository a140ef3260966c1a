"""``memjax score``: score every example of a data source into a store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memjax._checks import check_choice
from memjax.errors import InputError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    score = sub.add_parser("score", help="score every example of a data source into a store")
    score.add_argument("--model", required=True, help="model folder: Hugging Face checkpoint, "
                       "memjax convert output, or memjax audit's model/")
    score.add_argument("--data", default="digits", help="digits | FILE.npz | DIR of .npy | "
                       "tfds:NAME:SPLIT[@DIR] | images:DIR | jsonl:FILE")
    score.add_argument("--tokenizer", help="tokenizer folder for jsonl: text (Hugging Face)")
    score.add_argument("--max-length", type=int, default=128,
                       help="tokens per text with --tokenizer (padded/truncated)")
    score.add_argument("--signal", default="classification",
                       help="classification | tokens | contrastive")
    score.add_argument("--model-parallel", type=int, default=1,
                       help="devices per model replica (params sharded over them)")
    score.add_argument("--out", required=True, help="score store folder")
    score.add_argument("--batch-size", type=int, default=256)
    score.add_argument("--chunk-size", type=int, default=None,
                       help="examples per store chunk (a multiple of the batch size)")
    score.add_argument("--resume", action="store_true", help="continue an existing store")
    score.add_argument("--no-progress", action="store_true")
    score.set_defaults(run=cmd_score)


def _tokenizer(folder: str | None):
    """A Hugging Face tokenizer from a local folder (never downloads), or None."""
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise InputError(f"--tokenizer {folder!r}: expected a local tokenizer folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError("--tokenizer needs the transformers package "
                         "(pip install transformers)") from None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def cmd_score(args: argparse.Namespace) -> int:
    from memjax.convert import load
    from memjax.data import open_source
    from memjax.engine import ScoreStore, make_mesh, score
    from memjax.signals import SIGNAL_KINDS, signal_function

    check_choice("--signal", args.signal, SIGNAL_KINDS)  # before loading the model
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise InputError(f"--out {str(out)!r} already holds a store; pass --resume to "
                         "continue it, or choose another folder")
    source = open_source(args.data, tokenizer=_tokenizer(args.tokenizer),
                         max_length=args.max_length if args.tokenizer else None)
    model = load(args.model)
    fn, validate = signal_function(model, args.signal)
    store = score(fn, model.params, source, batch_size=args.batch_size,
                  mesh=make_mesh(model=args.model_parallel),
                  param_rules=list(model.partition_rules),
                  store=ScoreStore(out, chunk_size=args.chunk_size),
                  progress=not args.no_progress, validate=validate)
    info = store.info()
    print(f"scored {info['n_examples']} examples of {model.name} into {out} "
          f"({info['n_chunks']} chunks)")
    return 0
