"""Replicates per minute of a simulation study, locally and on a Dask LocalCluster (issue 6).

Runs the ``smoke`` study (lm, lme4, nlme on two partially clustered cells)
with 2 local worker processes and with a 2-worker ``LocalCluster``, prints a
table and writes ``reports/bench_study.json``.

Run: ``python benchmarks/bench_study.py [--reps N]`` (``nox -s bench`` runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="replicates per condition")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_study.json")
    args = parser.parse_args()

    from harness.studies.command import throughput

    table = throughput(reps=args.reps, workers=2, modes=("local", "dask"))
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(args.out, orient="records", indent=2)


if __name__ == "__main__":
    main()
