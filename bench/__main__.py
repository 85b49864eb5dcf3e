"""Run every bench suite side by side in one process on one device (SPEC 7).

    python -m bench                      # all suites on the default device (CUDA when present)
    python -m bench --suite attention    # one suite (repeatable)
    python -m bench --smoke              # tiny CPU-sized shapes, seconds (CI)
    python -m bench --budget-s 120       # a capped run: each suite gets a fair share of what is left and stops
                                         # before its next shape when that is spent (a row lists what it left out)

Each row is printed as it is measured. Ctrl-C or SIGTERM (``timeout``) stops the run inside a suite: the rows that
suite had made are kept (note "suite interrupted"), written with the summary, and the run exits 130.

Rows are appended to bench/results/<device-name>/<suite>.csv/.jsonl after each suite; a markdown summary of this
run (summary.md, rewritten after each suite) and PNG plots are written beside them.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback

from bench import common

SUITES = ["attention", "pooling", "infonce", "soup", "train_step"]


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:  # what the autotuner chose, for the record, also when a timeout (SIGINT) cuts the run short
        if os.environ.get("KALM_FAST_AUTOTUNE") == "1":
            from kalm_fast.kernels import utils

            for (op, key), chosen in utils.chosen_configs().items():
                for tune_key, config in chosen.items():
                    print(f"autotuned {op} {key} {tune_key}: {config}", flush=True)


def _main(argv=None) -> int:
    p = common.standard_args(__doc__.splitlines()[0])
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites (repeatable)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run, shared out suite by suite")
    args = p.parse_args(argv)
    suites = args.suite or SUITES
    device = args.device
    print(f"kalm_fast bench on {common.device_name(device)}: {', '.join(suites)}{' (smoke)' if args.smoke else ''}")

    all_rows: dict[str, list[dict]] = {}
    failed = []
    interrupted = None
    start = time.perf_counter()
    main_thread = threading.current_thread() is threading.main_thread()  # where a handler may be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `timeout` stops it like Ctrl-C
    try:
        for i, name in enumerate(suites):
            module = importlib.import_module(f"bench.bench_{name}")
            print(f"\n=== {name} ===", flush=True)
            t0 = time.perf_counter()
            if args.budget_s is not None:  # a fair share of what is left: a quick suite leaves more to the next
                common.set_deadline(max(0.0, args.budget_s - (t0 - start)) / (len(suites) - i))
            common.start_journal(echo=True)
            try:
                rows = module.run(smoke=args.smoke, device=device)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise TypeError(f"bench_{name}.run returned {type(rows).__name__}, not a list of row dicts")
                table = common.format_table(rows)
            except KeyboardInterrupt:  # keep what the suite had measured, then stop: the later suites get nothing
                rows, interrupted = common.stop_journal(), name
                for r in rows:
                    r["note"] = f"{r['note']}; suite interrupted" if r["note"] else "suite interrupted"
                table = common.format_table(rows) if rows else "(no row)"
                print(f"\n{name}: interrupted after {time.perf_counter() - t0:.1f} s; {len(rows)} rows kept",
                      file=sys.stderr, flush=True)
            except Exception:  # one broken suite must not hide the others' results
                traceback.print_exc()
                failed.append(name)
                continue
            finally:
                common.set_deadline(None)
                common.stop_journal()
            print(table)
            print(f"({name}: {time.perf_counter() - t0:.1f} s)")
            if rows:
                all_rows[name] = rows
                if not args.no_write:  # rows and the summary so far after every suite: a kill loses one suite at most
                    common.write_rows(rows, device, stem=name)
                    _write_summary(all_rows, device, smoke=args.smoke)
            if interrupted:
                break
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

    if not args.no_write and all_rows:
        print(f"\nsummary: {common.results_dir(device) / 'summary.md'}")
        if not args.no_plots and not interrupted:
            from bench import plots

            for path in plots.write_plots(all_rows, common.results_dir(device)):
                print(f"plot: {path}")
    if interrupted:
        left = suites[suites.index(interrupted) + 1:]
        print(f"\ninterrupted in {interrupted}" + (f"; not run: {', '.join(left)}" if left else ""), file=sys.stderr)
    if failed:
        print(f"\nsuites that failed: {', '.join(failed)}", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _write_summary(all_rows: dict[str, list[dict]], device: str, *, smoke: bool) -> None:
    summary = common.results_dir(device) / "summary.md"
    tmp = summary.with_suffix(".md.tmp")
    tmp.write_text(render_summary(all_rows, device, smoke=smoke))
    os.replace(tmp, summary)


def render_summary(all_rows: dict[str, list[dict]], device: str, *, smoke: bool) -> str:
    prov = common.provenance(device)
    head = [
        f"# kalm_fast bench — {prov['device_name']}{' (smoke sizes)' if smoke else ''}",
        "",
        f"{prov['date']} · torch {prov['torch']} · triton {prov['triton']} · kalm_fast {prov['kalm_fast']} "
        f"· git {prov['git_sha']}",
        "",
    ]
    from bench import targets

    body = [targets.render(all_rows), ""]
    for name, rows in all_rows.items():
        body += [f"## {name}", "", common.format_table(rows), ""]
    return "\n".join(head + body)


if __name__ == "__main__":
    sys.exit(main())
