"""The real-data gallery's case list and bookkeeping (``benchmarks/gallery.py``).

The fits themselves run in ``nox -s gallery``; here: every case is well formed, the
summary counts conclusive cases per kind (Gaussian, GLMM) and lists crashes, and
(with R) the export brings a GLMM case's data back as R had it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.model.family import FAMILIES
from harness.pipeline.settings import FitSettings

ROOT = Path(__file__).resolve().parents[1]


def _load_gallery():
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "benchmarks" / "gallery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gallery", module)
    spec.loader.exec_module(module)
    return module


gallery = _load_gallery()


def test_case_names_unique_and_datasets_well_formed() -> None:
    names = [case.name for case in gallery.CASES]
    assert len(names) == len(set(names))
    for case in gallery.CASES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", case.name), case.name
        assert gallery.valid_dataset_name(case.dataset), case.dataset
        assert case.family in FAMILIES, case.family
        assert case.about.strip()
        spec = case.spec()  # family, link and sigma_by are accepted by ModelSpec
        assert spec.family == case.family and spec.sigma_by == case.sigma_by
    for bad in ("lme4", "lme4::", "::x", "lme4::x; system('ls')", "../lme4::x", "a::b::c"):
        assert not gallery.valid_dataset_name(bad), bad
    with pytest.raises(ValueError, match="package::name"):
        gallery.export_data(["lme4::sleepstudy", "lme4::x; q()"], Path("unused"))


def test_gallery_has_both_kinds() -> None:
    kinds = [case.kind for case in gallery.CASES]
    assert kinds.count("glmm") >= 8
    assert {c.family for c in gallery.CASES} == {"gaussian", "binomial", "poisson"}
    glmm = gallery.select_cases(None, "glmm")
    assert glmm and all(c.family != "gaussian" for c in glmm)
    assert [c.name for c in gallery.select_cases(["sleepstudy", "cbpp"], "gaussian")] == [
        "sleepstudy"
    ]


def test_brms_runs_a_subset_of_eight_cases_of_every_family() -> None:
    """Issue 22: with brms among the engines the default is a subset of at least 8 cases."""
    three = gallery.select_cases(None, None, ("lme4", "pymc", "brms"))
    assert len(three) >= 8
    assert [c.name for c in three] == [c.name for c in gallery.CASES if c in three]
    assert {c.family for c in three} == {"gaussian", "binomial", "poisson"}
    assert any(c.sigma_by for c in three)
    assert len(gallery.select_cases(None, None, ("lme4", "pymc"))) == len(gallery.CASES)


def test_list_prints_the_cases_of_one_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert gallery.main(["--list", "--family", "glmm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == sum(c.kind == "glmm" for c in gallery.CASES)
    assert all(line.split()[1] in ("binomial", "poisson") for line in lines)


def _row(verdict: str, explanation: str) -> dict:
    return {"quantity": "x", "verdict": verdict, "explanation": explanation, "attribution": ""}


def _entry(name: str, kind: str, verdict: str | None, rows=(), error: str | None = None) -> dict:
    entry = {
        "name": name,
        "kind": kind,
        "family": "gaussian" if kind == "gaussian" else "poisson",
        "sigma_by": None,
        "dataset": "pkg::data",
        "formula": "y ~ 1 + (1 | g)",
        "about": "",
        "n_rows": 10,
        "verdict": verdict,
        "rounds": 1,
        "seconds": 1.0,
        "report": None,
        "error": error,
        "rows_not_pass": list(rows),
    }
    entry["conclusive"], entry["inconclusive_because"] = gallery.conclusive(entry)
    return entry


def test_conclusive_counts_each_kind_and_lists_crashes(tmp_path: Path) -> None:
    entries = [
        _entry("a", "gaussian", "pass"),
        _entry("b", "gaussian", "look", [_row("look", "explained by the named sources: 2.1")]),
        _entry("c", "gaussian", "fail", [_row("fail", "not explained: the rest is 12 MCSE")]),
        _entry("d", "glmm", "look", [_row("look", "gap +nan (+nan posterior SD)")]),
        _entry("e", "glmm", "unreliable", [_row("unreliable", "R-hat 1.02")]),
        _entry("f", "glmm", None, error="ValueError: boom"),
        _entry("g", "glmm", "look", [_row("look", "")]),
        _entry("h", "glmm", "pass"),
    ]
    assert [e["conclusive"] for e in entries] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert entries[5]["inconclusive_because"] == "crash"
    settings = FitSettings(draws=10, tune=10, chains=1)
    index, summary_path = gallery.write_index(entries, settings, tmp_path)
    summary = json.loads(summary_path.read_text())
    assert summary["conclusive"]["gaussian"]["conclusive"] == 2
    assert summary["conclusive"]["gaussian"]["cases"] == 3
    assert summary["conclusive"]["glmm"]["conclusive"] == 1
    assert summary["conclusive"]["glmm"]["cases"] == 5
    assert summary["conclusive"]["glmm"]["share"] == pytest.approx(0.2)
    assert set(summary["conclusive"]["glmm"]["not_conclusive"]) == {"d", "e", "f", "g"}
    assert summary["crashes"] == [{"name": "f", "error": "ValueError: boom"}]
    html = index.read_text()
    assert "Gaussian\n2/3" in html and "GLMM\n1/5" in html
    assert "Crashes (1)" in html and "ValueError: boom" in html


@pytest.mark.r
def test_export_brings_a_glmm_case_back_as_r_has_it(tmp_path: Path) -> None:
    from harness.model.spec import build_design

    frames = gallery.export_data(["MASS::OME", "MASS::bacteria"], tmp_path)
    case = next(c for c in gallery.CASES if c.name == "bacteria")
    data = gallery.case_data(case, frames)
    assert len(data) == 220 and data["ID"].nunique() == 50
    # R's level order, not the alphabet: the reference treatment is the placebo.
    assert list(data["trt"].cat.categories) == ["placebo", "drug", "drug+"]
    assert list(data["y"].cat.categories) == ["n", "y"]
    assert set(data["late"]) == {0, 1}
    assert (data["late"] == (data["week"] > 2)).all()
    design = build_design(case.spec(), data)
    assert design.trials is not None and set(design.y) == {0.0, 1.0}
    assert design.y.sum() == (data["y"] == "y").sum()
    assert list(design.X.columns) == ["(Intercept)", "trtdrug", "trtdrug+", "late"]
    # "N/A" is one of OME's levels, not a missing value.
    ome = frames["MASS::OME"]
    assert isinstance(ome["OME"].dtype, pd.CategoricalDtype)
    assert ome["OME"].notna().all() and "N/A" in set(ome["OME"])


def test_adaptive_cost_is_counted_in_runs_of_the_gallery_settings() -> None:
    settings = FitSettings(draws=1000, tune=1000, chains=4)
    one = {"draws_sampled": 4000, "iterations_sampled": 8000}
    three = {"draws_sampled": 4000 + 8000, "iterations_sampled": 8000 + 4 * (2000 + 2000)}
    assert gallery.sampling_cost(one, settings) == {"draws": 1.0, "iterations": 1.0}
    assert gallery.sampling_cost(three, settings) == {"draws": 3.0, "iterations": 3.0}
    assert gallery.sampling_cost(None, settings) is None
    entries = [
        {"cost": {"draws": 1.0, "iterations": 1.0}},
        {"cost": None},
        {"cost": {"draws": 3.0}},
    ]
    assert gallery.median_cost(entries) == {"draws": 2.0, "iterations": 1.0}
