"""The ``kalm-fast`` command line: one subcommand per entry of ``COMMANDS``.

    kalm-fast soup run-a run-b run-c -o souped --weights 2 1 1      # streaming weighted average of checkpoints

A command is a ``Command(help, add_arguments, run, user_errors)``: ``add_arguments(parser)`` fills its argparse
subparser, ``run(args) -> int`` does the work and imports its heavy modules itself (so ``kalm-fast --help`` starts
instantly and ``import kalm_fast`` stays light). Exceptions of the types in ``user_errors`` (bad inputs, an existing
output, a missing file) are printed as ``kalm-fast <command>: error: <message>`` with exit status 1 and no traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kalm_fast import __version__


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)


# ----------------------------------------------------------------------------------------------------------------
# soup
# ----------------------------------------------------------------------------------------------------------------


def _soup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help=".safetensors files or Hugging Face model folders (sharded safetensors + index json)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: a .safetensors file if IN[0] is one, else a folder mirroring IN[0]")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per input, finite and >= 0 with a positive sum (default: uniform)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="output dtype of every tensor (default: IN[0]'s, per tensor)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to accumulate (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--plain", action="store_true",
                   help="plain fp32 sums instead of compensated ones (less arithmetic; less exact where terms cancel)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _soup_run(args: argparse.Namespace) -> int:
    from kalm_fast.soup import soup

    t0 = time.perf_counter()
    out = soup(args.inputs, args.output, weights=args.weights, dtype=args.dtype, device=args.device,
               overwrite=args.overwrite, compensated=not args.plain, progress=not args.quiet)
    print(f"kalm-fast soup: wrote {out} from {len(args.inputs)} inputs in {time.perf_counter() - t0:.1f} s")
    return 0


COMMANDS: dict[str, Command] = {
    "soup": Command("average checkpoints (model soup), streamed tensor by tensor with an fp32 accumulator",
                    _soup_arguments, _soup_run),
}


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalm-fast", description="kalm_fast: fused kernels and a lean trainer for "
                                     "bidirectional LLM text-embedding models")
    parser.add_argument("--version", action="version", version=f"kalm_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        print(f"kalm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except command.user_errors as e:
        print(f"kalm-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
