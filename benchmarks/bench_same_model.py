"""Time the same-model check on sleepstudy (issue 4: under 2 s after import).

"After import" means after the libraries and R have started: ``import harness``,
``import pymc`` and one lme4 call to start R are done before the clock starts,
since every process pays them once whatever it then does.  Printed:

* ``first``: the first ``same_model(spec, data)`` in the process, lme4 fit
  included (PyTensor compiles its functions, from its on-disk cache if warm);
* ``repeat``: the same call again (compiled functions reused), lme4 fit included;
* ``given_fit``: ``same_model(spec, data, freq=fit)`` with the lme4 fit already made.

Run: ``python benchmarks/bench_same_model.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after the first")
    parser.add_argument("--json", help="also write the timings to this file")
    args = parser.parse_args()

    started = time.perf_counter()
    import pymc  # noqa: F401 - imported before the clock: an import cost, not the check's

    import harness as hz
    from harness.checks.same_model import same_model
    from harness.engines.lme4 import r_versions

    r_versions()  # starts R and sources fit.R
    data, spec = hz.datasets.load("sleepstudy")
    imports = time.perf_counter() - started

    def timed(**kwargs: object) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = same_model(spec, data, **kwargs)
        if not result.ok:
            raise SystemExit(f"same_model failed on sleepstudy: {result.reasons}")
        return time.perf_counter() - wall, time.process_time() - cpu

    first = timed()
    repeat = min((timed() for _ in range(args.repeats)), key=lambda t: t[0])
    freq = hz.fit_lme4(spec, data, n_sims=0)
    given = min((timed(freq=freq) for _ in range(args.repeats)), key=lambda t: t[0])
    timings = {
        "imports_and_r_start_s": round(imports, 3),
        "first_s": round(first[0], 3),
        "first_cpu_s": round(first[1], 3),
        "repeat_s": round(repeat[0], 3),
        "repeat_cpu_s": round(repeat[1], 3),
        "given_fit_s": round(given[0], 3),
        "given_fit_cpu_s": round(given[1], 3),
    }
    for name, value in timings.items():
        print(f"same_model sleepstudy {name:>24}: {value:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    main()
