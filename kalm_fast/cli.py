"""The ``kalm-fast`` command line: one subcommand per entry of ``COMMANDS``.

    kalm-fast demo                                                  # the whole recipe on embedded data (CPU)
    kalm-fast train recipes/demo.yaml --set stages.finetune.lr=1e-5 # pretrain -> mine -> finetune -> soup + MTEB
    kalm-fast mine MODEL --input pairs.jsonl -o mined.jsonl         # hard negatives from ranks 50-100
    kalm-fast eval MODEL --task retrieval data/eval/retrieval       # MTEB scores of a model folder
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
    # exception types printed as user errors, or a function returning them (imports them lazily)
    user_errors: tuple[type[BaseException], ...] | Callable[[], tuple] = (ValueError, OSError)


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


# ----------------------------------------------------------------------------------------------------------------
# train, demo, mine, eval
# ----------------------------------------------------------------------------------------------------------------


def _training_errors() -> tuple[type[BaseException], ...]:
    from kalm_fast.train.trainer import TrainingError

    return (ValueError, OSError, TrainingError)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo.yaml or recipes/kalm-v2-mini.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable), e.g. --set stages.finetune.lr=1e-5")


def _train_run(args: argparse.Namespace) -> int:
    from kalm_fast.train.config import load_recipe
    from kalm_fast.train.trainer import run_recipe

    result = run_recipe(load_recipe(args.recipe, overrides=args.overrides))
    if "table" in result:
        print("\n" + result["table"] + f"\n\nfinal model: {result['final_model']}")
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo); re-running resumes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--base", metavar="PATH", help="start from this Hugging Face model folder instead of MiniLM")
    g.add_argument("--from-scratch", action="store_true",
                   help="a tiny Qwen2-style decoder with random weights and its own BPE tokenizer")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of recipes/demo.yaml (repeatable)")


def _demo_run(args: argparse.Namespace) -> int:
    from kalm_fast.demo import run_demo

    run_demo(args.out, quick=args.quick, from_scratch=args.from_scratch, base=args.base, seed=args.seed,
             overrides=args.overrides)
    return 0


def _mine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the previous stage's model folder")
    p.add_argument("--input", required=True, help="jsonl/parquet rows {query, pos, ...}")
    p.add_argument("-o", "--output", required=True, help="jsonl written with a 'neg' list per row")
    p.add_argument("--rank-start", type=int, default=50)
    p.add_argument("--rank-end", type=int, default=100)
    p.add_argument("--num-negatives", type=int, default=7)
    p.add_argument("--consistency-top-k", type=int, default=10,
                   help="keep a row only if its positive ranks in the model's top k")
    p.add_argument("--instruction", help="query instruction (rows may carry their own)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def _mine_run(args: argparse.Namespace) -> int:
    from kalm_fast.model import Embedder
    from kalm_fast.train.config import MineConfig, build
    from kalm_fast.train.mine import mine

    cfg = build(MineConfig, {"input": args.input, "output": args.output, "rank_start": args.rank_start,
                             "rank_end": args.rank_end, "num_negatives": args.num_negatives,
                             "consistency_top_k": args.consistency_top_k, "instruction": args.instruction,
                             "batch_size": args.batch_size}, "kalm-fast mine")
    embedder = Embedder.from_pretrained(args.model, max_length=args.max_length)
    mine(embedder, args.input, args.output, cfg, seed=args.seed)
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hugging Face model folder")
    p.add_argument("--task", nargs=2, action="append", default=[], metavar=("KIND", "PATH"),
                   help="a local task: KIND in retrieval|sts|classification|clustering, PATH its folder or file "
                   "(repeatable; named after the folder)")
    p.add_argument("--mteb", action="append", default=[], metavar="NAME", help="a named MTEB task (data must be "
                   "reachable)")
    p.add_argument("--instruction", help="query instruction for every task")
    p.add_argument("-o", "--output", help="folder for scores.json and mteb's results")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512)


def _eval_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kalm_fast import eval as kf_eval
    from kalm_fast.model import Embedder

    tasks = [kf_eval.load_task_from_files(kind, path, name=Path(path).stem) for kind, path in args.task]
    tasks += kf_eval.named_tasks(args.mteb) if args.mteb else []
    if not tasks:
        raise ValueError("give at least one --task KIND PATH or --mteb NAME")
    instructions = {t.metadata.name: args.instruction for t in tasks} if args.instruction else None
    embedder = Embedder.from_pretrained(args.model, max_length=args.max_length)
    scores = kf_eval.evaluate(embedder, tasks, args.output, instructions=instructions, batch_size=args.batch_size)
    print(kf_eval.results_table({Path(args.model).name: scores}))
    return 0


COMMANDS: dict[str, Command] = {
    "demo": Command("run the whole recipe on embedded data (stdlib docs, all-MiniLM-L6-v2; 2.5-8 min on 2 cores)",
                    _demo_arguments, _demo_run, _training_errors),
    "train": Command("run a recipe: pretrain -> mine -> finetune -> soup, with MTEB checks",
                     _train_arguments, _train_run, _training_errors),
    "mine": Command("mine hard negatives from ranks [rank_start, rank_end) of a model", _mine_arguments, _mine_run,
                    _training_errors),
    "eval": Command("MTEB scores of a model on local task files or named tasks", _eval_arguments, _eval_run),
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
    user_errors = command.user_errors() if callable(command.user_errors) else command.user_errors
    try:
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        print(f"kalm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except user_errors as e:
        print(f"kalm-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
