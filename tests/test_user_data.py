"""Your own data from a CSV: lme4's own data sets through ``harness compare``.

Reference values come from lme4 run directly in R on the same CSV files
(``tests/reference/lme4_datasets.R``, which also exported the CSVs from lme4;
date and versions in ``tests/reference/lme4_datasets.json``).  The lme4 side
and the same-model check run for every data set without sampling; one small
end-to-end CLI run (Dyestuff, 2 chains x 300 draws) is in the default set, the
crossed and nested designs end to end are marked slow.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from harness.model.spec import ModelSpec, build_design
from harness.pipeline.settings import settings_from_env
from harness.user_data import read_data, write_outputs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
REFERENCE = json.loads((ROOT / "tests" / "reference" / "lme4_datasets.json").read_text())
MODELS = REFERENCE["models"]

#: Small sampler settings for end-to-end runs (read by harness.user_data.settings_from_env).
QUICK = {
    "HARNESS_DRAWS": "300",
    "HARNESS_TUNE": "300",
    "HARNESS_CHAINS": "2",
    "HARNESS_MAX_ROUNDS": "1",
}


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fit cache for the session, so repeated runs of a design reuse its fits."""
    return tmp_path_factory.getbasetemp() / "user-data-cache"


def run_cli(argv: list[str], cache: Path, **env: str) -> tuple[int, str, str]:
    """Run ``harness`` in this process (compiled models are reused); return (rc, out, err)."""
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        mp.setenv("HARNESS_CACHE_DIR", str(cache))
        for key in QUICK:
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def report_text(path: Path) -> str:
    """The visible text of a report (tags and inline images stripped)."""
    html = re.sub(r"data:[^\"')]+", "", path.read_text(encoding="utf-8"))
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def assert_lme4_matches_reference(freq, ref: dict, rtol: float = 1e-6) -> None:
    """Estimates agree with R's far beyond printed precision (R prints 4-5 digits)."""
    fixed = freq.fixed.set_index("term")
    for term, value in ref["fixed"].items():
        assert fixed.loc[term, "estimate"] == pytest.approx(value, rel=rtol), term
        assert fixed.loc[term, "se"] == pytest.approx(ref["se"][term], rel=rtol), term
    variance = dict(zip(freq.variance["component"], freq.variance["estimate"], strict=True))
    assert set(variance) == set(ref["variance"])
    for component, value in ref["variance"].items():
        assert variance[component] == pytest.approx(value, rel=rtol, abs=1e-8), component
    assert freq.reml_criterion == pytest.approx(ref["reml_criterion"], rel=1e-9)
    assert freq.loglik_ml == pytest.approx(ref["loglik_ml"], rel=1e-9)
    assert freq.singular is ref["singular"]


# --------------------------------------------------------------------------- reading (no R)


def test_reference_records_its_provenance():
    for key in ("script", "date", "R", "lme4"):
        assert REFERENCE[key]
    assert (ROOT / REFERENCE["script"]).is_file()
    assert set(MODELS) == {"dyestuff", "dyestuff2", "penicillin", "pastes"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lme4_csv_exports_read_as_r_reads_them(name):
    data = read_data(ROOT / MODELS[name]["csv"])
    assert len(data) == MODELS[name]["nobs"]
    design = build_design(ModelSpec(MODELS[name]["formula"]), data)
    # Factor names and level counts as lme4's ngrps() gives them (Pastes: cask:batch).
    assert {b.factor: b.n_levels for b in design.blocks} == MODELS[name]["ngrps"]


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("HARNESS_DRAWS", "123")
    monkeypatch.setenv("HARNESS_CHAINS", "3")
    monkeypatch.delenv("HARNESS_TUNE", raising=False)
    settings = settings_from_env()
    assert (settings.draws, settings.chains, settings.tune) == (123, 3, 1000)
    monkeypatch.setenv("HARNESS_TUNE", "lots")
    with pytest.raises(ValueError, match="HARNESS_TUNE='lots' must be a whole number"):
        settings_from_env()


# --------------------------------------------------------------------------- lme4 side and same model (R, no sampling)


@pytest.mark.r
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lme4_side_matches_lme4_run_directly_in_r(name):
    import harness as hz

    ref = MODELS[name]
    data = read_data(ROOT / ref["csv"])
    freq = hz.fit_lme4(ModelSpec(ref["formula"]), data, n_sims=0)
    assert_lme4_matches_reference(freq, ref)


# --------------------------------------------------------------------------- end to end


def quick_settings():
    """FitSettings as the end-to-end runs get them from QUICK."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in QUICK.items():
            mp.setenv(key, value)
        return settings_from_env()


@pytest.fixture(scope="module")
def dyestuff_run(tmp_path_factory):
    """``harness compare`` on Dyestuff: report and JSON (2 chains x 300 draws)."""
    out = tmp_path_factory.mktemp("dyestuff")
    report, js = out / "dyestuff.html", out / "dyestuff.json"
    argv = [
        "compare",
        str(DATA / "dyestuff.csv"),
        "--formula",
        MODELS["dyestuff"]["formula"],
        "--out",
        str(report),
        "--json",
        str(js),
        "--seed",
        "3",
    ]
    rc, stdout, stderr = run_cli(argv, shared_cache(tmp_path_factory), **QUICK)
    return rc, stdout, stderr, report, js


@pytest.mark.r
@pytest.mark.sampling
def test_cli_dyestuff_report_and_json(dyestuff_run):
    rc, stdout, stderr, report, js = dyestuff_run
    assert rc == 0, stderr
    assert "same-model check: ok" in stdout and str(report) in stdout
    payload = json.loads(js.read_text())
    ref = MODELS["dyestuff"]
    fixed = {r["term"]: r for r in payload["tables"]["fixed"]}
    assert fixed["(Intercept)"]["lme4_estimate"] == pytest.approx(ref["fixed"]["(Intercept)"])
    assert fixed["(Intercept)"]["lme4_se"] == pytest.approx(ref["se"]["(Intercept)"], rel=1e-6)
    variance = {r["component"]: r for r in payload["tables"]["variance"]}
    for component, value in ref["variance"].items():
        assert variance[component]["lme4_estimate"] == pytest.approx(value, rel=1e-6)
    assert payload["same_model"]["ok"] is True
    assert abs(payload["same_model"]["difference"]) < 1e-6
    assert payload["lme4"]["loglik_ml"] == pytest.approx(ref["loglik_ml"], rel=1e-9)
    data = payload["data"]
    assert (data["rows_read"], data["rows_used"], data["rows_dropped"]) == (30, 30, 0)
    assert payload["pymc"]["chains"] == 2 and payload["pymc"]["draws"] == 300
    adaptive = payload["pymc"]["adaptive"]  # HARNESS_MAX_ROUNDS=1: one round, then the reason
    assert len(adaptive["rounds"]) == 1 and adaptive["rounds"][0]["action"] == "first run"
    assert adaptive["reliable"] or adaptive["reason"].startswith("budget spent: 1 rounds")
    assert "sampling: 1 round(s)" in stdout
    assert set(payload["tables"]) >= {"fixed", "variance", "offsets", "agreement", "diagnostics"}
    text = report_text(report)
    assert "Yield ~ 1 + (1 | Batch)" in text and "1527.5" in text
    assert "Same model" in text
    assert "Rounds of sampling" in text


@pytest.mark.r
@pytest.mark.sampling
def test_failed_write_leaves_neither_file(dyestuff_run, tmp_path, tmp_path_factory, monkeypatch):
    """A failure while writing the report removes the already-rendered JSON too."""
    import harness._io
    from harness.user_data import compare_data

    assert dyestuff_run[0] == 0
    # The module's run cached every stage: this only loads them.
    result = compare_data(
        read_data(DATA / "dyestuff.csv"),
        MODELS["dyestuff"]["formula"],
        name="dyestuff",
        seed=3,
        settings=quick_settings(),
        cache_dir=shared_cache(tmp_path_factory),
    )
    assert all(result.cached.values())

    filled: list[Path] = []
    fill = harness._io._fill

    def broken(tmp: Path, content: bytes) -> None:
        # The JSON is written in full; the report's disk fills up half way.
        filled.append(tmp)
        if len(filled) == 1:
            fill(tmp, content)
            return
        Path(tmp).write_bytes(content[:10])
        raise OSError("disk full")

    monkeypatch.setattr(harness._io, "_fill", broken)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(result, tmp_path / "r.html", tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.r
@pytest.mark.sampling
@pytest.mark.parametrize("name", ["penicillin", "pastes"])
def test_cli_crossed_and_nested_designs(name, tmp_path, tmp_path_factory):
    ref = MODELS[name]
    report, js = tmp_path / f"{name}.html", tmp_path / f"{name}.json"
    argv = [
        "compare",
        str(ROOT / ref["csv"]),
        "--formula",
        ref["formula"],
        "--out",
        str(report),
        "--json",
        str(js),
    ]
    rc, stdout, stderr = run_cli(
        argv, shared_cache(tmp_path_factory), HARNESS_CHAINS="2", HARNESS_MAX_ROUNDS="2"
    )
    assert rc == 0, stderr
    assert "same-model check: ok" in stdout
    payload = json.loads(js.read_text())
    assert payload["same_model"]["ok"] is True, payload["same_model"]["reasons"]
    variance = {r["component"]: r["lme4_estimate"] for r in payload["tables"]["variance"]}
    assert variance == pytest.approx(ref["variance"], rel=1e-6)
    fixed = {r["term"]: r["lme4_estimate"] for r in payload["tables"]["fixed"]}
    assert fixed == pytest.approx(ref["fixed"], rel=1e-6)
    # Every group of every factor is in the offsets table, named as lme4 names it.
    offsets = payload["tables"]["offsets"]
    assert {(r["group_factor"]) for r in offsets} == set(ref["ngrps"])
    assert len(offsets) == sum(ref["ngrps"].values())
    assert "Same model" in report_text(report)
