"""The real-data gallery: lme4 vs PyMC on data sets shipped with R packages.

``nox -s gallery`` (or ``python benchmarks/gallery.py``) fits every case with
both engines through the same path as ``harness compare`` (``fit_design`` with
a ``(ModelSpec, DataFrame)`` pair; the fit cache makes reruns resumable),
writes one report per case to ``reports/gallery/<case>.html``, and an index
(``index.html``) and ``summary.json`` with, per case, the verdict, the rounds
of sampling, the seconds and the explanation of every row that did not pass.
A case that errors is listed with its error.  The summary counts the
conclusive cases (verdict ``pass``, or ``look`` with every other row explained)
separately for the Gaussian and the GLMM cases.

The data come from the R packages at run time (``r_scripts/export_data.R``
writes CSV files to a temporary folder; no network).

    python benchmarks/gallery.py [--cases NAME ...] [--family gaussian|glmm] [--list]
                                 [--draws N] [--tune N] [--chains N] [--engines lme4,pymc,brms]
                                 [--out-dir reports/gallery] [--refit]

``--engines lme4,pymc,brms`` adds brms (issue 22): each case then also gets the
PyMC-vs-brms comparison in combined Monte Carlo error and the log-density identity,
listed per case in the index and the summary; brms compiles once per model
structure (kept in ``$HARNESS_CACHE_DIR/brms``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
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

from harness.engines.registry import (  # noqa: E402
    DEFAULT_ENGINES,
    check_installed,
    parse_engines,
)
from harness.model.spec import ModelSpec  # noqa: E402
from harness.pipeline.runner import fit_design  # noqa: E402
from harness.pipeline.settings import FitSettings  # noqa: E402
from harness.report.page import render_figures, render_page, write_html, write_report  # noqa: E402
from harness.report.tables import attribution_text  # noqa: E402

log = logging.getLogger("harness")


@dataclass(frozen=True)
class Case:
    """One gallery case: a shipped data set, a formula and what it exercises.

    ``prepare`` is a plain function from the exported frame to the frame that is
    fitted (a deterministic subset, a derived column such as a 0/1 response); what
    it does is said in ``about``.  ``family`` and ``sigma_by`` go to
    :class:`~harness.model.spec.ModelSpec` as they are; every case runs with the
    same sampler settings.
    """

    name: str
    dataset: str  # "package::name"
    formula: str
    about: str
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    family: str = "gaussian"  # "gaussian", "binomial" or "poisson"
    sigma_by: str | None = None

    @property
    def kind(self) -> str:
        """``"gaussian"`` or ``"glmm"``: the two groups the summary counts separately."""
        return "gaussian" if self.family == "gaussian" else "glmm"

    def spec(self) -> ModelSpec:
        """The model this case fits."""
        return ModelSpec(
            self.formula,
            name=f"{self.name}: {self.formula}",
            family=self.family,
            sigma_by=self.sigma_by,
        )


KINDS = ("gaussian", "glmm")


def _insteval(frame: pd.DataFrame) -> pd.DataFrame:
    # The first 40 lecturers: thousands of rows, hundreds of crossed students.
    keep = sorted(frame["d"].unique(), key=str)[:40]
    return frame[frame["d"].isin(keep)].reset_index(drop=True)


def _verbagg(frame: pd.DataFrame) -> pd.DataFrame:
    # Persons 1-80 of 316 (R's level order): every item for each, 1920 rows.
    keep = list(frame["id"].cat.categories[:80])
    return frame[frame["id"].isin(keep)].reset_index(drop=True)


def _guimmun(frame: pd.DataFrame) -> pd.DataFrame:
    # The first 80 of 161 communities (R's level order), every child in them.
    keep = list(frame["comm"].cat.categories[:80])
    return frame[frame["comm"].isin(keep)].reset_index(drop=True)


def _bacteria(frame: pd.DataFrame) -> pd.DataFrame:
    # MASS's glmmPQL example uses I(week > 2); a 0/1 column says the same.
    return frame.assign(late=(frame["week"] > 2).astype(int))


def _arabidopsis(frame: pd.DataFrame) -> pd.DataFrame:
    # Nutrient level (1 or 8) and rack (1 or 2) are treatments, stored as integers.
    out = frame.copy()
    for column in ("nutrient", "rack"):
        out[column] = pd.Categorical(out[column].astype(str))
    return out


GAUSSIAN_CASES = [
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
    # Added for issue 20: structures the cases above do not have.
    Case(
        "carrots",
        "lmerTest::carrots",
        "Preference ~ sens2 + Homesize + (1 + sens2 | Consumer) + (1 | Product)",
        "crossed consumers x products with a random slope (lmerTest's example; 103 x 12)",
    ),
    Case(
        "tvbo",
        "lmerTest::TVbo",
        "Coloursaturation ~ TVset * Picture + (1 | Assessor) + (1 | Assessor:TVset)"
        " + (1 | Assessor:Picture)",
        "sensory panel: 8 assessors and two interaction grouping factors (lmerTest's example)",
    ),
    Case(
        "sitka",
        "MASS::Sitka",
        "size ~ Time + treat + (Time | tree)",
        "growth curves of 79 trees, uncentred time (152-258 days)",
    ),
    Case(
        "petrol",
        "MASS::petrol",
        "Y ~ SG + VP + V10 + EP + (1 | No)",
        "32 rows, 10 crude oils, four uncentred covariates (MASS's lme example)",
    ),
    Case(
        "beets",
        "pbkrtest::beets",
        "sugpct ~ block + sow + harvest + (1 | block:harvest)",
        "small split plot: 30 rows, 6 whole plots (pbkrtest's example)",
    ),
    Case(
        "assay",
        "nlme::Assay",
        "logDens ~ sample * dilut + (1 | Block) + (1 | Block:sample) + (1 | Block:dilut)",
        "split block whose blocking factor has 2 levels; 60 rows, 30 fixed effects",
    ),
    Case(
        "orthodont_sigma",
        "nlme::Orthodont",
        "distance ~ age * Sex + (age | Subject)",
        "one residual SD per sex (sigma_by; nlme's varIdent, Pinheiro & Bates ch. 5)",
        sigma_by="Sex",
    ),
    Case(
        "scotssec",
        "mlmRev::ScotsSec",
        "attain ~ verbal * sex + (1 | primary) + (1 | second)",
        "partially crossed primary and secondary schools, 3435 pupils (mlmRev's example)",
    ),
    Case(
        "early",
        "mlmRev::Early",
        "cog ~ age * trt + (age | id)",
        "random slope with 3 visits per infant, 103 infants",
    ),
]

GLMM_CASES = [
    Case(
        "cbpp",
        "lme4::cbpp",
        "cbind(incidence, size - incidence) ~ period + (1 | herd)",
        "binomial with trials, 15 herds (glmer's reference example)",
        family="binomial",
    ),
    Case(
        "ome",
        "MASS::OME",
        "cbind(Correct, Trials - Correct) ~ Loud + Noise + Age + OME + (1 | ID)",
        "binomial with trials, 77 children, uncentred loudness (35-70 dB) and age",
        family="binomial",
    ),
    Case(
        "bacteria",
        "MASS::bacteria",
        "y ~ trt + late + (1 | ID)",
        "binary, about 4 visits per child, 50 children; late = week > 2 (MASS's glmmPQL example)",
        _bacteria,
        family="binomial",
    ),
    Case(
        "guimmun",
        "mlmRev::guImmun",
        "immun ~ kid2p + mom25p + ord + ethn + momEd + husEd + momWork + rural + pcInd81"
        " + (1 | mom) + (1 | comm)",
        "binary, 1.35 children per mother, mothers within communities; the first 80 of 161 "
        "communities",
        _guimmun,
        family="binomial",
    ),
    Case(
        "verbagg",
        "lme4::VerbAgg",
        "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
        "binary crossed persons x items, a two-level factor response; persons 1-80 of 316 "
        "(1920 rows)",
        _verbagg,
        family="binomial",
    ),
    Case(
        "contraception",
        "mlmRev::Contraception",
        "use ~ age + I(age^2) + urban + livch + (urban | district)",
        "binary with a correlated random slope on a factor, 60 districts",
        family="binomial",
    ),
    Case(
        "epil",
        "MASS::epil",
        "y ~ lbase * trt + lage + V4 + (1 | subject)",
        "overdispersed repeated seizure counts, 59 patients x 4 visits (MASS's glmmPQL example)",
        family="poisson",
    ),
    Case(
        "grouseticks",
        "lme4::grouseticks",
        "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
        "overdispersed counts: an observation-level effect, broods within locations "
        "(lme4's example)",
        family="poisson",
    ),
    Case(
        "arabidopsis",
        "lme4::Arabidopsis",
        "total.fruits ~ nutrient * amd + rack + status + (1 | popu) + (1 | gen)",
        "overdispersed, zero-heavy counts; 9 populations crossed with 24 genotypes",
        _arabidopsis,
        family="poisson",
    ),
    Case(
        "mmmec",
        "mlmRev::Mmmec",
        "deaths ~ uvb + offset(log(expected)) + (1 | nation/region)",
        "Poisson with an offset (expected deaths), regions within 9 nations",
        family="poisson",
    ),
]

CASES = GAUSSIAN_CASES + GLMM_CASES


def export_data(datasets: list[str], folder: Path) -> dict[str, pd.DataFrame]:
    """Data sets by ``package::name``, written by R to CSV and read back.

    R's factors come back as categoricals with R's level order (so numeric-looking
    labels stay factors and the reference level is R's); numbers stay numbers.
    Only ``NA`` is missing: labels such as ``N/A`` (OME's factor OME) are data.
    """
    bad = [item for item in datasets if not valid_dataset_name(item)]
    if bad:
        raise ValueError(f"data set names must read package::name, not {bad}")
    script = ROOT / "r_scripts" / "export_data.R"
    subprocess.run(["Rscript", str(script), str(folder), *datasets], check=True)
    out = {}
    for item in datasets:
        package, name = item.split("::")
        stem = folder / f"{package}__{name}"
        levels = pd.read_csv(f"{stem}__levels.csv", dtype=str, keep_default_na=False, na_values=[])
        factors = {
            str(column): list(part["level"])
            for column, part in levels.groupby("column", sort=False)
        }
        frame = pd.read_csv(
            f"{stem}.csv",
            dtype=dict.fromkeys(factors, str),
            keep_default_na=False,
            na_values=["NA"],
        )
        for column, order in factors.items():
            frame[column] = pd.Categorical(frame[column], categories=order)
        out[item] = frame
    return out


def case_data(case: Case, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The frame ``case`` fits: its data set after ``prepare``, unused levels dropped.

    A subset keeps every category of the whole data set; R's ``droplevels`` is
    applied so that a fixed-effect factor has no level without rows.
    """
    data = frames[case.dataset].copy()
    data = case.prepare(data) if case.prepare else data
    for column in data.columns:
        if isinstance(data[column].dtype, pd.CategoricalDtype):
            data[column] = data[column].cat.remove_unused_categories()
    return data


def valid_dataset_name(dataset: str) -> bool:
    """``package::name`` as R spells both (no path, no code)."""
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9.]*::[A-Za-z.][A-Za-z0-9._]*", dataset) is not None


def _bayes_pairs(result) -> list[dict]:
    """Each comparison of two Bayesian fits (PyMC vs brms): verdict, max |z|, its rows' z."""
    return [
        {
            "engines": list(pair),
            "verdict": cmp.verdict,
            "max_abs_z": cmp.max_abs_z,
            "z": dict(zip(cmp.table["row"], cmp.table["z"].astype(float), strict=True)),
        }
        for pair, cmp in result.bayes_pairs.items()
    ]


def _identity(result) -> dict | None:
    """The PyMC-vs-brms log-density identity (None when brms did not run)."""
    check = result.same_model_bayes
    if check is None:
        status = result.same_model_bayes_status
        return {"status": status, "ok": None, "max_abs_diff": None} if status else None
    return {
        "status": result.same_model_bayes_status,
        "ok": bool(check.ok),
        "max_abs_diff": float(check.max_abs_diff),
    }


def _non_pass_rows(result) -> list[dict[str, str]]:
    cmp = result.comparison
    rows = []
    for (a, b), pair in result.bayes_pairs.items():
        rows += [
            {
                "quantity": f"{a} vs {b}: {r['row']}",
                "verdict": r["verdict"],
                "explanation": r["note"],
                "attribution": "",
                "attribution_values": None,
            }
            for r in pair.table.to_dict("records")
            if r["verdict"] != "pass"
        ]
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
    case: Case,
    data: pd.DataFrame,
    settings: FitSettings,
    out_dir: Path,
    refit: bool,
    engines: tuple[str, ...] | None = None,
) -> dict:
    """Fit, compare and report one case; errors are returned, not raised."""
    started = time.perf_counter()
    entry = {
        "name": case.name,
        "dataset": case.dataset,
        "formula": case.formula,
        "family": case.family,
        "kind": case.kind,
        "sigma_by": case.sigma_by,
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
        result = fit_design(
            (case.spec(), data),
            settings=settings,
            refit=refit,
            render=render_figures,
            engines=engines,
        )
        report = write_report(result, out_dir / f"{case.name}.html")
        bayes = result.bayes_info
        adaptive = bayes.settings.get("adaptive") if isinstance(bayes.settings, dict) else None
        entry.update(
            verdict=result.verdict,
            rounds=len(adaptive["rounds"]) if adaptive and "rounds" in adaptive else 1,
            budget_spent=adaptive.get("budget_spent") if adaptive else None,
            cost=sampling_cost(adaptive, settings),
            report=report.name,
            rows_not_pass=_non_pass_rows(result),
            fit_seconds={k: round(float(v), 2) for k, v in result.timings.items()},
            cached=result.cached,
            engines=result.engines,
            bayes_pairs=_bayes_pairs(result),
            same_model_bayes=_identity(result),
        )
    except Exception as err:  # listed with its error, never hidden
        log.exception("gallery case %s failed", case.name)
        entry["error"] = f"{type(err).__name__}: {err}"
    entry["seconds"] = time.perf_counter() - started
    entry["conclusive"], entry["inconclusive_because"] = conclusive(entry)
    return entry


_NAN = re.compile(r"\bnan\b", re.IGNORECASE)


def conclusive(entry: dict) -> tuple[bool, str]:
    """Whether a case ended conclusive, and if not, why not.

    Conclusive: no error, and the verdict is ``pass``, or ``look`` with every
    row that did not pass explained (a ``look`` row with an explanation that
    prints no ``nan``).  ``fail`` (a gap the named sources leave unexplained),
    ``unreliable`` (the sampler's diagnostics) and a crash are not.
    """
    if entry.get("error"):
        return False, "crash"
    verdict = entry.get("verdict")
    if verdict == "pass":
        return True, ""
    if verdict != "look":
        return False, str(verdict)
    unexplained = [
        row["quantity"]
        for row in entry["rows_not_pass"]
        if row["verdict"] != "look"
        or not str(row.get("explanation") or "").strip()
        or _NAN.search(f"{row.get('explanation', '')} {row.get('attribution', '')}")
    ]
    if unexplained:
        return False, f"look with rows not explained (or nan): {unexplained}"
    return True, ""


def shares(entries: list[dict]) -> dict[str, dict]:
    """Per kind (gaussian, glmm): cases, conclusive cases and their share."""
    out = {}
    for kind in KINDS:
        group = [e for e in entries if e["kind"] == kind]
        n_conclusive = sum(bool(e["conclusive"]) for e in group)
        out[kind] = {
            "cases": len(group),
            "conclusive": n_conclusive,
            "share": n_conclusive / len(group) if group else None,
            "not_conclusive": {
                e["name"]: e["inconclusive_because"] for e in group if not e["conclusive"]
            },
        }
    return out


def sampling_cost(adaptive: dict | None, settings: FitSettings) -> dict[str, float] | None:
    """What the adaptive loop sampled, in multiples of one run of the gallery's settings.

    ``draws``: post-warm-up draws; ``iterations``: warm-up included (the
    sampler's work; wall time depends on the machine).
    """
    if not adaptive or "draws_sampled" not in adaptive:
        return None
    one_draws = settings.chains * settings.draws
    one_iterations = settings.chains * (settings.draws + settings.tune)
    cost = {"draws": adaptive["draws_sampled"] / one_draws}
    if "iterations_sampled" in adaptive:
        cost["iterations"] = adaptive["iterations_sampled"] / one_iterations
    return {k: round(float(v), 3) for k, v in cost.items()}


def median_cost(entries: list[dict]) -> dict[str, float | None]:
    """The median over cases of each :func:`sampling_cost` measure (cases without one left out)."""
    out: dict[str, float | None] = {}
    for measure in ("draws", "iterations"):
        values = sorted(
            e["cost"][measure] for e in entries if e.get("cost") and measure in e["cost"]
        )
        out[measure] = float(pd.Series(values).median()) if values else None
    return out


def write_index(
    entries: list[dict],
    settings: FitSettings,
    out_dir: Path,
    engines: tuple[str, ...] | None = None,
) -> tuple[Path, Path]:
    """``index.html`` and ``summary.json`` of the gallery."""
    order = ["pass", "look", "fail", "unreliable"]
    counts = {v: sum(e["verdict"] == v for e in entries) for v in order}
    crashes = [{"name": e["name"], "error": e["error"]} for e in entries if e["error"] is not None]
    reliable = sum(
        e["error"] is None and not any(r["verdict"] == "unreliable" for r in e["rows_not_pass"])
        for e in entries
    )
    by_kind = shares(entries)
    summary = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {
            "draws": settings.draws,
            "tune": settings.tune,
            "chains": settings.chains,
            "engines": list(engines or DEFAULT_ENGINES),
        },
        "counts": counts,
        "conclusive": by_kind,
        "crashes": crashes,
        "errors": len(crashes),
        "cases_without_unreliable_rows": reliable,
        "median_adaptive_cost": median_cost(entries),
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
        "conclusive": {kind: share for kind, share in by_kind.items() if share["cases"]},
        "crashes": crashes,
        "n_errors": len(crashes),
        "share_reliable": f"{reliable}/{len(entries)}",
        "settings": summary["settings"],
        "generated": summary["created"],
    }
    index = write_html(render_page("gallery.html.j2", context), out_dir / "index.html")
    return index, json_path


def select_cases(names: list[str] | None, kind: str | None) -> list[Case]:
    """The cases named (all by default), in the gallery's order, of one kind if given."""
    known = {c.name: c for c in CASES}
    cases = [known[n] for n in names] if names else list(CASES)
    return [c for c in cases if kind is None or c.kind == kind]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument(
        "--family", choices=KINDS, help="only the gaussian cases or only the GLMM cases"
    )
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--out-dir", default=str(ROOT / "reports" / "gallery"))
    parser.add_argument("--refit", action="store_true", help="ignore cached fits")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument(
        "--engines",
        default=None,
        help="engines, comma-separated, lme4 among them (default: lme4,pymc; "
        "lme4,pymc,brms adds brms)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    unknown = sorted(set(args.cases or []) - {c.name for c in CASES})
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(c.name for c in CASES)}")
    engines = None
    if args.engines is not None:
        try:
            engines = parse_engines(args.engines)
            check_installed(engines)
        except (ValueError, RuntimeError) as err:
            parser.error(str(err))
    cases = select_cases(args.cases, args.family)
    if args.list:
        for case in cases:
            extra = f" [sigma_by={case.sigma_by}]" if case.sigma_by else ""
            print(f"{case.name:18s} {case.family:9s} {case.dataset:24s} {case.formula}{extra}")
        return 0
    settings = FitSettings(draws=args.draws, tune=args.tune, chains=args.chains)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harness-gallery-") as folder:
        frames = export_data(sorted({c.dataset for c in cases}), Path(folder))
    entries = []
    for case in cases:
        entry = run_case(case, case_data(case, frames), settings, out_dir, args.refit, engines)
        print(
            f"{case.name}: {entry['error'] or entry['verdict']} ({entry['seconds']:.0f} s)",
            flush=True,
        )
        entries.append(entry)
    index, summary = write_index(entries, settings, out_dir, engines)
    for kind, share in shares(entries).items():
        if share["cases"]:
            print(f"{kind}: {share['conclusive']}/{share['cases']} conclusive")
    print(f"index -> {index}\nsummary -> {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
