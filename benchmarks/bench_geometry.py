"""Benchmark: the sampler's geometry for the fixed effects and nutpie's mass matrix.

Run ``python benchmarks/bench_geometry.py`` from the repository root (``nox -s bench``
runs it too).  Each case's model is compiled twice: fixed effects sampled in lme4's
own basis (``direct``, the harness before issue 20) and in the centred basis
(``centred``, :func:`harness.engines.pymc.centred_transform`, the default).  Each
is then sampled, with the same seed and settings, in these variants:

- ``direct`` / ``centred``: nutpie's diagonal mass matrix;
- ``direct+lowrank`` / ``centred+lowrank``: ``low_rank_modified_mass_matrix=True``;
- ``centred+tune2x``: the diagonal mass matrix with twice the warm-up.

For each run it records, over every quantity the harness compares (fixed effects,
SDs, correlations, sigma, informed offsets; :func:`harness.engines.adaptive.diagnose`):
the smallest bulk and tail ESS, the largest R-hat, divergences, sampling seconds,
gradient evaluations, and the efficiency ``min bulk ESS / sampling second`` and
``min bulk ESS per 1,000 gradient evaluations`` (the latter does not depend on the
machine's load).  ``ok`` is the adaptive loop's target (R-hat <= 1.01, bulk and tail
ESS >= 400, no divergence).

Cases: ``cake`` (lme4's data via Rscript: ``temp`` runs 175-225, the uncentred
predictor of issue 20; skipped without R), ``sleepstudy`` and ``cafe`` (shipped),
and ``cafe_many`` (the cafe simulation with 300 cafes: many groups).

Writes ``reports/bench_geometry.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "reports" / "bench_geometry.json"
VARIANTS = ("direct", "centred", "direct+lowrank", "centred+lowrank", "centred+tune2x")


def _cake() -> Any:
    import pandas as pd

    from harness.model.spec import ModelSpec

    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        script = ROOT / "r_scripts" / "export_data.R"
        subprocess.run(["Rscript", str(script), folder, "lme4::cake"], check=True)
        data = pd.read_csv(Path(folder) / "lme4__cake.csv")
    return ModelSpec("angle ~ recipe + temp + (1 | recipe:replicate)", name="cake"), data


def cases() -> dict[str, Any]:
    """name -> () -> (spec, data), or None when the case cannot be built here."""
    import harness as hz

    def shipped(name: str, **kwargs: Any) -> Any:
        return lambda: tuple(reversed(hz.datasets.load(name, **kwargs)))

    return {
        "cake": _cake,
        "sleepstudy": shipped("sleepstudy"),
        "cafe": shipped("cafe"),
        "cafe_many": shipped("cafe", n_cafes=300),
    }


def _compile(design: Any, priors: Any, basis: str) -> tuple[Any, float]:
    import nutpie

    from harness.engines.nutpie_entry import light_entry_points
    from harness.engines.pymc import build_model

    started = time.perf_counter()
    with light_entry_points():
        compiled = nutpie.compile_pymc_model(build_model(design, priors, fixed_basis=basis))
    return compiled, time.perf_counter() - started


def run_variant(
    compiled: Any, design: Any, variant: str, *, draws: int, tune: int, chains: int, seed: int
) -> dict[str, Any]:
    import nutpie

    from harness.engines.adaptive import AdaptiveSettings, diagnose
    from harness.engines.samplers import available_cores

    started = time.perf_counter()
    idata = nutpie.sample(
        compiled,
        draws=draws,
        tune=2 * tune if variant.endswith("tune2x") else tune,
        chains=chains,
        cores=min(chains, available_cores()),
        seed=seed,
        progress_bar=False,
        low_rank_modified_mass_matrix=variant.endswith("lowrank"),
        save_warmup=False,
    )
    seconds = time.perf_counter() - started
    diag = diagnose(idata, design, AdaptiveSettings())
    bulk = diag["min_ess_bulk"] or float("nan")
    return {
        "variant": variant,
        "sample_seconds": seconds,
        "min_ess_bulk": bulk,
        "min_ess_bulk_quantity": diag["min_ess_bulk_quantity"],
        "min_ess_tail": diag["min_ess_tail"],
        "max_r_hat": diag["max_r_hat"],
        "max_r_hat_quantity": diag["max_r_hat_quantity"],
        "divergences": diag["divergences"],
        "ok": diag["ok"],
        "gradient_evaluations": diag["gradient_evaluations"],
        "ess_per_second": bulk / seconds,
        "ess_per_1k_gradients": (
            1000.0 * bulk / diag["gradient_evaluations"] if diag["gradient_evaluations"] else None
        ),
    }


def run_case(
    name: str, make: Any, *, draws: int, tune: int, chains: int, seed: int
) -> list[dict[str, Any]]:
    from harness.model.priors import resolve_priors
    from harness.model.spec import build_design

    made = make()
    if made is None:
        print(f"{name}: skipped (needs R)", flush=True)
        return []
    spec, data = made
    design = build_design(spec, data)
    priors = resolve_priors(design)
    compiled = {basis: _compile(design, priors, basis) for basis in ("direct", "centred")}
    rows = []
    for variant in VARIANTS:
        model, compile_s = compiled[variant.split("+")[0]]
        row = run_variant(model, design, variant, draws=draws, tune=tune, chains=chains, seed=seed)
        row = {"case": name, "formula": spec.formula, "compile_seconds": compile_s, **row}
        rows.append(row)
        print(
            f"{name:11s} {variant:16s} ESS bulk {row['min_ess_bulk']:7.0f} "
            f"({row['min_ess_bulk_quantity']}) tail {row['min_ess_tail']:6.0f}  "
            f"R-hat {row['max_r_hat']:.3f}  div {row['divergences']:3d}  "
            f"{row['sample_seconds']:6.1f} s  ESS/s {row['ess_per_second']:7.1f}  "
            f"ESS/1k grad {row['ess_per_1k_gradients'] or float('nan'):6.1f}  "
            f"{'ok' if row['ok'] else 'not ok'}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default all)")
    parser.add_argument("--draws", type=int, default=1000, help="per chain (report: 1000)")
    parser.add_argument("--tune", type=int, default=1000, help="warm-up per chain (report: 1000)")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    available = cases()
    names = args.cases or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(available)}")
    rows = []
    for name in names:
        rows += run_case(
            name,
            available[name],
            draws=args.draws,
            tune=args.tune,
            chains=args.chains,
            seed=args.seed,
        )
    settings = {"draws": args.draws, "tune": args.tune, "chains": args.chains, "seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
