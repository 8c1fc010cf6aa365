"""Benchmark: adaptive sampling against one run, per case (rounds, diagnostics, cost).

Run ``python benchmarks/bench_adaptive.py`` from the repository root (``nox -s bench``
runs it too).  Each case is fitted once with :func:`harness.fit_pymc` at the
report's settings (:class:`harness.pipeline.runner.FitSettings`: 4 chains x 1000 draws,
1000 tuning steps, target_accept 0.9, seed 1; ``--draws/--tune/--chains`` for a
smaller run) and the default adaptive budget.  Round 1 of the adaptive loop
*is* the single run (same seed, same settings, draw for draw; where it diverges
it stops at its first divergent stretch, a prefix of that run), so "before" is
round 1 and "after" the returned draws.  The cost of the loop relative to one
run is given three ways: post-warm-up draws (what the budget counts; the same
on any machine), iterations (warm-up included) and sampling seconds.  The
models are compiled before timing, so compile seconds (a new parameterisation
compiles once per process) are reported apart.

``--gallery`` adds the real-data gallery's cases (``benchmarks/gallery.py``, data
exported from the R packages; the few whose sampling alone takes minutes are left
out), sampled the same way.

Writes ``reports/bench_adaptive.json`` and prints a table.  Acceptance (issue 20):
the median cost over the cases at most 1.5x a single run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "reports" / "bench_adaptive.json"
DATA = ROOT / "tests" / "data"


def cases() -> dict[str, Any]:
    """name -> () -> (spec, data): the shipped designs plus lme4's and nlme's data sets."""
    import pandas as pd

    import harness as hz
    from harness.model.spec import ModelSpec

    def shipped(name: str) -> Any:
        return lambda: tuple(reversed(hz.datasets.load(name)))

    def csv(file: str, formula: str, name: str) -> Any:
        return lambda: (ModelSpec(formula, name=name), pd.read_csv(DATA / file))

    return {
        "cafe": shipped("cafe"),
        "sleepstudy": shipped("sleepstudy"),
        "partially_clustered": shipped("partially_clustered"),
        "partially_clustered_hetero": shipped("partially_clustered_hetero"),
        "dyestuff": csv("dyestuff.csv", "Yield ~ 1 + (1 | Batch)", "dyestuff"),
        # lme4's Dyestuff2: a singular fit (lme4's SD is exactly 0).
        "dyestuff2": csv("dyestuff2.csv", "Yield ~ 1 + (1 | Batch)", "dyestuff2"),
        "penicillin": csv(
            "penicillin.csv", "diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin"
        ),
        "pastes": csv("pastes.csv", "strength ~ 1 + (1 | batch/cask)", "pastes"),
        # tests/data/orthodont.R writes it from nlme's Orthodont.
        "orthodont": csv("orthodont.csv", "distance ~ age * Sex + (age | Subject)", "orthodont"),
    }


#: Gallery cases left out of ``--gallery``: minutes of sampling each on two cores.
SLOW_GALLERY_CASES = ("insteval", "early", "arabidopsis", "contraception", "verbagg", "guimmun")


def gallery_cases(skip: tuple[str, ...] = SLOW_GALLERY_CASES) -> dict[str, Any]:
    """name -> () -> (spec, data) for the real-data gallery's cases (``benchmarks/gallery.py``).

    The data are exported from the R packages once (R needed); ``skip`` leaves out
    the cases whose sampling alone takes minutes here.
    """
    import tempfile

    bench_dir = str(Path(__file__).resolve().parent)
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import gallery

    chosen = [c for c in gallery.CASES if c.name not in skip]
    folder = Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    frames = gallery.export_data(sorted({c.dataset for c in chosen}), folder)
    return {
        f"gallery:{c.name}": (lambda c=c: (c.spec(), gallery.case_data(c, frames))) for c in chosen
    }


def _diag_row(diag: dict[str, Any]) -> dict[str, Any]:
    return {
        "max_r_hat": diag["max_r_hat"],
        "max_r_hat_quantity": diag["max_r_hat_quantity"],
        "min_ess_bulk": diag["min_ess_bulk"],
        "min_ess_tail": diag["min_ess_tail"],
        "divergences": diag["divergences"],
        "ok": diag["ok"],
    }


def run_case(
    name: str, make: Any, seed: int, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    import harness as hz
    from harness.engines.pymc import centered_blocks, sample_once
    from harness.model.priors import resolve_priors
    from harness.model.spec import build_design
    from harness.pipeline.settings import FitSettings

    spec, data = make()
    settings = FitSettings(**(sizes or {}))
    design = build_design(spec, data)
    priors = resolve_priors(design)
    # Compile both parameterisations first (tiny runs), so sampling seconds are sampling.
    compile_s = 0.0
    for centered in ((), centered_blocks(design, "all")):
        run = sample_once(
            design,
            priors,
            seed=0,
            draws=10,
            tune=10,
            chains=1,
            sampler=settings.sampler,
            target_accept=0.8,
            centered=centered,
        )
        compile_s += run.compile_seconds
    started = time.perf_counter()
    fit = hz.fit_pymc(
        spec,
        data,
        seed=seed,
        draws=settings.draws,
        tune=settings.tune,
        chains=settings.chains,
        target_accept=settings.target_accept,
        design=design,
        adaptive=settings.adaptive_settings(),
    )
    wall = time.perf_counter() - started
    record = fit.settings["adaptive"]
    rounds = record["rounds"]
    total = sum(r["sample_seconds"] for r in rounds)
    first = rounds[0]
    # One run of the settings; a first run stopped at its first divergent stretch holds
    # fewer draws, and its seconds are scaled up at its own rate per iteration.
    single_draws = settings.chains * settings.draws
    single_iterations = settings.chains * (settings.tune + settings.draws)
    single = first["sample_seconds"] * single_iterations / max(first["iterations"], 1)
    return {
        "case": name,
        "formula": spec.formula,
        "rounds": len(rounds),
        "actions": [r["action"] for r in rounds[1:]],
        "final_parameterization": record["final"]["parameterization"],
        "final_target_accept": record["final"]["target_accept"],
        "before": _diag_row(rounds[0]["after"]),
        "after": _diag_row(rounds[-1]["after"] if rounds[-1]["kept"] else _kept(rounds)),
        "reliable": record["reliable"],
        "budget_spent": record["budget_spent"],
        "reason": record["reason"],
        "draws_ratio": record["draws_sampled"] / single_draws,
        "iterations_ratio": record["iterations_sampled"] / single_iterations,
        "single_sample_seconds": single,
        "adaptive_sample_seconds": total,
        "ratio": total / single if single > 0 else float("nan"),
        "adaptive_wall_seconds": wall,
        "compile_seconds_both_forms": compile_s,
    }


def _kept(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The diagnosis of the draws kept (a round that was not kept reverted to its 'before')."""
    return rounds[-1]["before"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gallery",
        action="store_true",
        help="also the real-data gallery's cases (sampling only; R exports their data)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for size in ("draws", "tune", "chains"):
        parser.add_argument(f"--{size}", type=int, default=None, help="per run (default: report's)")
    args = parser.parse_args(argv)
    sizes = {k: getattr(args, k) for k in ("draws", "tune", "chains") if getattr(args, k)}
    available = cases()
    if args.gallery:
        available.update(gallery_cases())
    names = args.cases or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(available)}")
    rows = []
    for name in names:
        row = run_case(name, available[name], args.seed, sizes)
        rows.append(row)
        b, a = row["before"], row["after"]
        print(
            f"{name:28s} rounds {row['rounds']} {row['actions']}  "
            f"before: R-hat {b['max_r_hat']:.3f} ESS {b['min_ess_bulk']:.0f}/{b['min_ess_tail']:.0f} "
            f"div {b['divergences']}  after: R-hat {a['max_r_hat']:.3f} "
            f"ESS {a['min_ess_bulk']:.0f}/{a['min_ess_tail']:.0f} div {a['divergences']}  "
            f"cost x{row['draws_ratio']:.2f} draws, x{row['iterations_ratio']:.2f} iterations, "
            f"{row['single_sample_seconds']:.1f}s -> {row['adaptive_sample_seconds']:.1f}s "
            f"(x{row['ratio']:.2f}) {'reliable' if row['reliable'] else row['reason']}",
            flush=True,
        )
    medians = {
        key: statistics.median(r[key] for r in rows)
        for key in ("draws_ratio", "iterations_ratio", "ratio")
    }
    conclusive = sum(bool(r["reliable"]) for r in rows)
    print(
        f"median cost of the adaptive loop / one run: x{medians['draws_ratio']:.2f} in draws, "
        f"x{medians['iterations_ratio']:.2f} in iterations, x{medians['ratio']:.2f} in sampling "
        f"seconds (acceptance: <= 1.5); diagnostics hold in {conclusive} of {len(rows)} cases"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"cases": rows, "median_ratio": medians["ratio"], "medians": medians}
    summary["sizes"] = sizes
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
