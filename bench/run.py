"""``python -m bench.run [--stage NAME ...]``: run the benchmarks and write ``bench/results/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import tempfile
from pathlib import Path

from bench import stages
from bench.harness import Context, load, machine, markdown, write_results


def available() -> dict[str, object]:
    """Bench stage modules by their STAGE name, in a stable order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(stages.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"bench.stages.{info.name}")
        found[module.STAGE] = module
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the chosen stages (default: all) and print the table."""
    modules = available()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--stage", action="append", choices=sorted(modules), help="run only this stage (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median taken)")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for checking the bench itself")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="--quick with one timed run and no alternative that needs installing (what the tests run)",
    )
    parser.add_argument("--research-data", type=Path, help="folder of real camera-trap data (never committed)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.repeats = True, 1

    chosen = args.stage or list(modules)
    # The stages' own progress and problem lines (20 deliberately missing keys per download run...) would bury
    # the bench's; errors still show.
    logging.getLogger("animl_retrain").setLevel(logging.ERROR)
    mach = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="animl-bench-") as tmp:
        work = args.work or Path(tmp)
        for name in chosen:
            print(f"== {name}", file=sys.stderr, flush=True)
            ctx = Context(
                work=work / name,
                repeats=args.repeats,
                quick=args.quick,
                research_data=args.research_data,
                machine=mach,
                smoke=args.smoke,
                load_before=load(samples=2, interval=0.01) if args.smoke else load(),
            )
            ctx.work.mkdir(parents=True, exist_ok=True)
            stage_rows = modules[name].run(ctx)
            rows += stage_rows
            if not args.quick:  # written stage by stage: a later stage's failure loses nothing measured
                latest, table = write_results(stage_rows, [name], mach)
    print(markdown([r.to_json() for r in rows], mach))
    if args.quick:
        print("--quick: results not written (small inputs, for checking the bench itself)", file=sys.stderr)
    else:
        print(f"written: {latest} and {table}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
