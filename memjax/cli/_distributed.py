"""Multi-host runs from the command line: every subcommand takes ``--distributed`` or
``--coordinator HOST:PORT --num-processes N --process-id I``.

The same command is started once per host (process); before it does anything else,
``jax.distributed.initialize`` joins them, so the engine's mesh spans every process's
devices, each process reads only its own rows of every batch and its own blocks of a
sharded checkpoint, and only process 0 writes stores and reports (the engine and
:func:`memjax.report.write_report` check ``jax.process_index()``). On CPU the processes
exchange data over gloo.
"""

from __future__ import annotations

import argparse
import sys

from memjax.errors import InputError

TITLE = "multi-host (start the same command on every host)"


def add_options(parser: argparse.ArgumentParser) -> None:
    """The multi-host options, as one group of ``parser``."""
    group = parser.add_argument_group(TITLE)
    group.add_argument("--distributed", action="store_true",
                       help="join the other processes with jax.distributed.initialize(), "
                       "the cluster auto-detected (TPU pods, SLURM, Open MPI)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="or explicitly: process 0's address (with --num-processes and "
                       "--process-id)")
    group.add_argument("--num-processes", type=int, metavar="N")
    group.add_argument("--process-id", type=int, metavar="I")


def initialize(args: argparse.Namespace) -> None:
    """Join the processes the options name (nothing without them)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if args.distributed and any(v is not None for v in explicit):
        raise InputError("--distributed auto-detects the cluster; give it alone, or "
                         "--coordinator, --num-processes and --process-id without it")
    if not args.distributed:
        if any(v is None for v in explicit):
            raise InputError("--coordinator, --num-processes and --process-id go together "
                             f"(got {_given(args)})")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise InputError(f"--process-id {args.process_id}: expected 0..N-1 for "
                             f"--num-processes {args.num_processes}")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    import jax

    # gloo: CPU devices of different processes exchange data (other backends ignore it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except Exception as error:  # the runtime raises several types; say which flags failed
        flags = "--distributed" if args.distributed else _given(args)
        raise InputError(f"{flags}: jax.distributed.initialize failed: "
                         f"{' '.join(str(error).split())[:300]}") from None
    print(f"memjax: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} of {jax.device_count()} devices here",
          file=sys.stderr)


def _given(args: argparse.Namespace) -> str:
    return " ".join(f"{flag} {value}" for flag, value in (
        ("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
        ("--process-id", args.process_id)) if value is not None)
