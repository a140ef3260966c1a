"""``memjax score``: score every example of a data source into a store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from memjax._checks import check_choice
from memjax.cli._common import add_data_options, check_out_folder, open_data, positive_int
from memjax.errors import InputError, MemjaxError, StoreError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    score = sub.add_parser("score", help="score every example of a data source into a store")
    score.add_argument("--model", required=True, help="model folder: Hugging Face checkpoint, "
                       "memjax convert output, or memjax audit's model/")
    score.add_argument("--allow-pickle", action="store_true",
                       help="accept a checkpoint with only .bin/.pt weights "
                       "(torch.load(weights_only=True))")
    score.add_argument("--data", default="digits", help="digits | FILE.npz | DIR of .npy | "
                       "tfds:NAME:SPLIT[@DIR] | images:DIR | jsonl:FILE | pairs:FILE | "
                       "wds:PATTERN; images and texts are prepared with the model's own "
                       "preprocessor_config.json and tokenizer")
    add_data_options(score)
    score.add_argument("--tokenizer", help="a Hugging Face tokenizer folder to use instead of "
                       "the model's own")
    score.add_argument("--signal", default="classification",
                       help="classification | tokens | contrastive")
    score.add_argument("--model-parallel", type=positive_int, default=1,
                       help="devices per model replica (params sharded over them)")
    score.add_argument("--out", required=True, help="score store folder")
    score.add_argument("--batch-size", type=positive_int, default=256)
    score.add_argument("--chunk-size", type=positive_int, default=None,
                       help="examples per store chunk (a multiple of the batch size)")
    score.add_argument("--no-length-buckets", dest="length_buckets", action="store_false",
                       help="tokens: run every batch at full length in source order (default: "
                       "sorted by length within windows, trimmed to length buckets; same "
                       "scores)")
    existing = score.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue the store in --out (same model, data and options)")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the store in --out (its scores are deleted)")
    score.add_argument("--no-progress", action="store_true")
    score.set_defaults(run=cmd_score)


def _tokenizer_folder(folder: str) -> str:
    """``--tokenizer``: a local folder that transformers loads as a tokenizer (never
    downloads)."""
    from memjax.convert.loading import TOKENIZER_FILES

    path = Path(folder)
    what = f"--tokenizer {folder!r}"
    if not path.is_dir():
        raise InputError(f"{what}: no such folder; expected a Hugging Face tokenizer folder")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{what} has no tokenizer files; expected a Hugging Face tokenizer "
                         f"folder with one of {', '.join(TOKENIZER_FILES)}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError(f"{what} needs the transformers package (pip install "
                         "transformers)") from None
    try:
        AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds on bad files
        raise InputError(f"{what}: transformers cannot load this tokenizer: "
                         f"{' '.join(str(error).split())[:300]}") from None
    return str(path)


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """--out must be writable, and a store already in it is resumed or replaced only when
    asked (a store with no finished chunk holds nothing and is simply replaced)."""
    from memjax.engine import ScoreStore

    check_out_folder(out, "--out")
    store = ScoreStore(out)
    others = store.other_files()
    if others:
        raise InputError(f"--out {str(out)!r} holds files that are not a score store "
                         f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                         "choose a new or empty folder")
    if not store.exists() or resume or overwrite:
        return
    try:
        done, total = len(store.done_chunks()), store.n_chunks
    except StoreError as error:
        raise StoreError(f"--out: {error}; pass --overwrite to replace it") from None
    if done:
        raise InputError(f"--out {str(out)!r} already holds a store ({done}/{total} chunks "
                         "done); pass --resume to continue it, --overwrite to replace it, "
                         "or choose another folder")


def _resume_hint(out: Path) -> str:
    """How to continue a store that a failed run leaves with finished chunks, or ''."""
    from memjax.engine import ScoreStore

    store = ScoreStore(out)
    try:
        done = len(store.done_chunks()) if store.exists() else 0
        total = store.n_chunks if done else 0
    except StoreError:
        return ""
    if not done:
        return ""
    return (f"; --out {str(out)!r} keeps {done}/{total} finished chunks: rerun the same "
            "command with --resume to compute the rest (same model, data and options), or "
            "with --overwrite to start over")


def cmd_score(args: argparse.Namespace) -> int:
    from memjax.convert import load
    from memjax.engine import ScoreStore, make_mesh, score
    from memjax.signals import SIGNAL_KINDS, signal_function

    check_choice("--signal", args.signal, SIGNAL_KINDS)  # before loading the model
    if args.max_length is not None and args.max_length < 1:
        raise InputError(f"--max-length {args.max_length}: expected a positive number of "
                         "tokens")
    if args.chunk_size is not None and args.chunk_size % args.batch_size:
        raise InputError(f"--chunk-size {args.chunk_size}: expected a multiple of --batch-size "
                         f"{args.batch_size}")
    out = Path(args.out)
    _check_out(out, args.resume, args.overwrite)
    # One mesh for loading and scoring: a checkpoint's params are read lazily straight onto
    # their shardings (each host reading only its devices' blocks) and never moved again.
    mesh = make_mesh(model=args.model_parallel)
    model = load(args.model, allow_pickle=args.allow_pickle, mesh=mesh)
    if args.tokenizer is not None:
        model = model.replace(tokenizer=_tokenizer_folder(args.tokenizer))
    fn, validate = signal_function(model, args.signal)
    source = open_data(args.data, model, args)
    try:
        store = score(fn, model.params, source, batch_size=args.batch_size,
                      mesh=mesh,
                      param_rules=list(model.partition_rules),
                      store=ScoreStore(out, chunk_size=args.chunk_size,
                                       overwrite=args.overwrite),
                      progress=not args.no_progress, validate=validate,
                      length_buckets=args.length_buckets)
    except StoreError:
        raise  # refusals and corrupt stores say what to do themselves
    except MemjaxError as error:
        raise type(error)(f"{error}{_resume_hint(out)}") from None
    except KeyboardInterrupt:
        hint = _resume_hint(out)
        if hint:
            print(f"memjax: {hint[2:]}", file=sys.stderr)
        raise
    print(f"scored {len(source)} examples of {model.name} into {out} "
          f"({store.n_chunks} chunks)")
    return 0
