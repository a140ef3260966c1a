"""``memjax convert``: a Hugging Face checkpoint folder to a memjax model folder."""

from __future__ import annotations

import argparse
from typing import Any

from memjax.cli._common import check_out_folder


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    convert = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder")
    convert.add_argument("src", help="folder with config.json and *.safetensors")
    convert.add_argument("dst", help="output folder (orbax checkpoint + memjax_model.json, "
                         "and src's tokenizer files and preprocessor_config.json)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16",
                                                                 "float16"])
    convert.add_argument("--allow-pickle", action="store_true",
                         help="accept .bin/.pt weights (torch.load(weights_only=True))")
    convert.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from memjax.convert import load_pretrained, save

    check_out_folder(args.dst, "dst")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    model, config = load_pretrained(args.src, dtype=dtype[args.dtype],
                                    allow_pickle=args.allow_pickle)
    save(model, config, args.dst, copy_from=args.src)
    print(f"converted {args.src} ({type(model).__name__}) -> {args.dst}")
    return 0
