"""The real-data gallery: lme4 vs PyMC on data sets shipped with R packages.

``nox -s gallery`` (or ``python benchmarks/gallery.py``) fits every case with
both engines through the same path as ``harness compare`` (``fit_design`` with
a ``(ModelSpec, DataFrame)`` pair; the fit cache makes reruns resumable),
writes one report per case to ``reports/gallery/<case>.html``, and an index
(``index.html``) and ``summary.json`` with, per case, the verdict, the rounds
of sampling, the seconds and the explanation of every row that did not pass.
A case that errors is listed with its error.

The data come from the R packages at run time (``r_scripts/export_data.R``
writes CSV files to a temporary folder; no network).

    python benchmarks/gallery.py [--cases NAME ...] [--draws N] [--tune N] [--chains N]
                                 [--out-dir reports/gallery] [--refit]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.model.spec import ModelSpec  # noqa: E402
from harness.pipeline.runner import fit_design  # noqa: E402
from harness.pipeline.settings import FitSettings  # noqa: E402
from harness.report.page import render_figures, render_page, write_html, write_report  # noqa: E402
from harness.report.tables import attribution_text  # noqa: E402

log = logging.getLogger("harness")


@dataclass(frozen=True)
class Case:
    """One gallery case: a shipped data set, a formula and what it exercises."""

    name: str
    dataset: str  # "package::name"
    formula: str
    about: str
    subset: Callable[[pd.DataFrame], pd.DataFrame] | None = None


def _insteval(frame: pd.DataFrame) -> pd.DataFrame:
    # The first 40 lecturers: thousands of rows, hundreds of crossed students.
    keep = sorted(frame["d"].unique(), key=str)[:40]
    return frame[frame["d"].isin(keep)].reset_index(drop=True)


CASES = [
    Case(
        "sleepstudy",
        "lme4::sleepstudy",
        "Reaction ~ Days + (Days | Subject)",
        "correlated random slope (lme4's reference example)",
    ),
    Case(
        "sleepstudy_uncorr",
        "lme4::sleepstudy",
        "Reaction ~ Days + (Days || Subject)",
        "uncorrelated random slope (||)",
    ),
    Case("dyestuff", "lme4::Dyestuff", "Yield ~ 1 + (1 | Batch)", "one-way, 6 batches"),
    Case(
        "dyestuff2",
        "lme4::Dyestuff2",
        "Yield ~ 1 + (1 | Batch)",
        "one-way with a singular fit (lme4's SD is 0)",
    ),
    Case(
        "penicillin",
        "lme4::Penicillin",
        "diameter ~ 1 + (1 | plate) + (1 | sample)",
        "fully crossed factors",
    ),
    Case("pastes", "lme4::Pastes", "strength ~ 1 + (1 | batch/cask)", "nested factors (a/b)"),
    Case(
        "cake",
        "lme4::cake",
        "angle ~ recipe + temp + (1 | recipe:replicate)",
        "factor fixed effect and an interaction grouping factor",
    ),
    Case(
        "insteval",
        "lme4::InstEval",
        "y ~ service + (1 | s) + (1 | d)",
        "crossed students and lecturers, thousands of rows (40 lecturers)",
        _insteval,
    ),
    Case(
        "orthodont",
        "nlme::Orthodont",
        "distance ~ age * Sex + (age | Subject)",
        "random slope with a factor interaction (the issue's example)",
    ),
    Case(
        "machines",
        "nlme::Machines",
        "score ~ Machine + (1 | Worker/Machine)",
        "nested random effects with a factor fixed effect",
    ),
    Case("oats", "nlme::Oats", "yield ~ nitro + Variety + (1 | Block/Variety)", "split plot"),
    Case("rail", "nlme::Rail", "travel ~ 1 + (1 | Rail)", "one-way, 6 rails"),
    Case("ergostool", "nlme::ergoStool", "effort ~ Type + (1 | Subject)", "randomised block"),
    Case(
        "chickweight",
        "datasets::ChickWeight",
        "weight ~ Time + (Time | Chick)",
        "growth curves, 50 chicks",
    ),
    Case(
        "chickweight_diet",
        "datasets::ChickWeight",
        "weight ~ Time * Diet + (Time | Chick)",
        "growth curves with a factor interaction",
    ),
    Case(
        "pixel",
        "nlme::Pixel",
        "pixel ~ day + (day | Dog) + (1 | Dog:Side)",
        "random slope plus an interaction grouping factor",
    ),
    Case(
        "alfalfa",
        "nlme::Alfalfa",
        "Yield ~ Date + Variety + (1 | Block/Variety)",
        "split plot with two factors",
    ),
    Case(
        "bodyweight",
        "nlme::BodyWeight",
        "weight ~ Time * Diet + (Time | Rat)",
        "random slope, factor interaction, 16 rats",
    ),
    Case("ovary", "nlme::Ovary", "follicles ~ Time + (1 | Mare)", "repeated measures"),
    Case(
        "co2",
        "datasets::CO2",
        "uptake ~ conc + Type * Treatment + (1 | Plant)",
        "crossed fixed factors, 12 plants",
    ),
    Case(
        "oxboys",
        "nlme::Oxboys",
        "height ~ age + (age | Subject)",
        "random slope, strongly informed groups",
    ),
    Case("orange", "datasets::Orange", "circumference ~ age + (1 | Tree)", "5 trees"),
    Case(
        "mathachieve",
        "nlme::MathAchieve",
        "MathAch ~ SES + (SES | School)",
        "7185 pupils in 160 schools",
    ),
    Case(
        "loblolly",
        "datasets::Loblolly",
        "height ~ age + (age | Seed)",
        "random slope, 14 seed sources",
    ),
]


def export_data(datasets: list[str], folder: Path) -> dict[str, pd.DataFrame]:
    """Data sets by ``package::name``, written by R to CSV and read back."""
    script = ROOT / "r_scripts" / "export_data.R"
    subprocess.run(["Rscript", str(script), str(folder), *datasets], check=True)
    out = {}
    for item in datasets:
        package, name = item.split("::")
        out[item] = pd.read_csv(folder / f"{package}__{name}.csv")
    return out


def _non_pass_rows(result) -> list[dict[str, str]]:
    cmp = result.comparison
    rows = []
    for table, key in ((cmp.fixed, "term"), (cmp.variance, "component"), (cmp.agreement, None)):
        for r in table.to_dict("records"):
            if r["verdict"] == "pass":
                continue
            quantity = r[key] if key else f"{r['group_factor']}: {r['term']} (offsets' correlation)"
            rows.append(
                {
                    "quantity": str(quantity),
                    "verdict": r["verdict"],
                    "explanation": r.get("explanation", ""),
                    "attribution": attribution_text(r.get("attribution")),
                    "attribution_values": r.get("attribution"),
                }
            )
    return rows


def run_case(
    case: Case, data: pd.DataFrame, settings: FitSettings, out_dir: Path, refit: bool
) -> dict:
    """Fit, compare and report one case; errors are returned, not raised."""
    started = time.perf_counter()
    entry = {
        "name": case.name,
        "dataset": case.dataset,
        "formula": case.formula,
        "about": case.about,
        "n_rows": len(data),
        "verdict": None,
        "rounds": None,
        "seconds": None,
        "report": None,
        "error": None,
        "rows_not_pass": [],
    }
    try:
        spec = ModelSpec(case.formula, name=f"{case.name}: {case.formula}")
        result = fit_design((spec, data), settings=settings, refit=refit, render=render_figures)
        report = write_report(result, out_dir / f"{case.name}.html")
        bayes = result.bayes_info
        adaptive = bayes.settings.get("adaptive") if isinstance(bayes.settings, dict) else None
        entry.update(
            verdict=result.verdict,
            rounds=len(adaptive["rounds"]) if adaptive and "rounds" in adaptive else 1,
            budget_spent=adaptive.get("budget_spent") if adaptive else None,
            report=report.name,
            rows_not_pass=_non_pass_rows(result),
            fit_seconds={k: round(float(v), 2) for k, v in result.timings.items()},
            cached=result.cached,
        )
    except Exception as err:  # listed with its error, never hidden
        log.exception("gallery case %s failed", case.name)
        entry["error"] = f"{type(err).__name__}: {err}"
    entry["seconds"] = time.perf_counter() - started
    return entry


def write_index(entries: list[dict], settings: FitSettings, out_dir: Path) -> tuple[Path, Path]:
    """``index.html`` and ``summary.json`` of the gallery."""
    order = ["pass", "look", "fail", "unreliable"]
    counts = {v: sum(e["verdict"] == v for e in entries) for v in order}
    n_errors = sum(e["error"] is not None for e in entries)
    reliable = sum(
        e["error"] is None and not any(r["verdict"] == "unreliable" for r in e["rows_not_pass"])
        for e in entries
    )
    share = f"{reliable}/{len(entries)}"
    summary = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"draws": settings.draws, "tune": settings.tune, "chains": settings.chains},
        "counts": counts,
        "errors": n_errors,
        "cases_without_unreliable_rows": reliable,
        "cases": entries,
    }
    json_path = out_dir / "summary.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(json_path)
    context = {
        "title": "lme4 vs PyMC on real data: the gallery",
        "cases": entries,
        "counts": counts,
        "n_errors": n_errors,
        "share_reliable": share,
        "settings": summary["settings"],
        "generated": summary["created"],
    }
    index = write_html(render_page("gallery.html.j2", context), out_dir / "index.html")
    return index, json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--out-dir", default=str(ROOT / "reports" / "gallery"))
    parser.add_argument("--refit", action="store_true", help="ignore cached fits")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    known = {c.name: c for c in CASES}
    if args.list:
        for case in CASES:
            print(f"{case.name:20s} {case.dataset:24s} {case.formula}")
        return 0
    unknown = sorted(set(args.cases or []) - set(known))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(known)}")
    cases = [known[n] for n in args.cases] if args.cases else list(CASES)
    settings = FitSettings(draws=args.draws, tune=args.tune, chains=args.chains)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harness-gallery-") as folder:
        frames = export_data(sorted({c.dataset for c in cases}), Path(folder))
    entries = []
    for case in cases:
        data = frames[case.dataset]
        data = case.subset(data) if case.subset else data
        entry = run_case(case, data, settings, out_dir, args.refit)
        print(
            f"{case.name}: {entry['error'] or entry['verdict']} ({entry['seconds']:.0f} s)",
            flush=True,
        )
        entries.append(entry)
    index, summary = write_index(entries, settings, out_dir)
    print(f"index -> {index}\nsummary -> {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
