"""Bad input to ``harness compare``: one readable line, exit status 1, no output file.

Every failing case runs the real command (in this process, or in a fresh one
for "R is missing") and asserts the message, the exit status, that stderr is
one line without a traceback, and that neither the report nor the JSON file
exists.  The cases that are not failures (rows with missing values, a group
with one observation and a random slope, collinear predictors, a singular
fit, too few draws) assert what the reader is told instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.model.spec import ModelSpec, build_design
from tests.test_user_data import DATA, MODELS, QUICK, ROOT, report_text, run_cli, shared_cache

DYESTUFF = MODELS["dyestuff"]["formula"]


@pytest.fixture
def outputs(tmp_path):
    """Where a run would write: the report and the JSON (neither may exist after a failure)."""
    out = tmp_path / "out"
    return out / "report.html", out / "tables.json"


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def toy(n_groups: int = 6, per: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{i}" for i in range(n_groups)], per)
    x = rng.normal(size=g.size)
    return pd.DataFrame({"y": 1 + x + rng.normal(size=g.size), "x": x, "g": g})


def fails(csv: Path | str, formula: str, outputs, tmp_path, *extra: str) -> str:
    """Run the command expecting failure; return its one-line message."""
    report, js = outputs
    argv = [
        "compare",
        str(csv),
        "--formula",
        formula,
        "--out",
        str(report),
        "--json",
        str(js),
        *extra,
    ]
    rc, stdout, stderr = run_cli(argv, tmp_path / "cache")
    assert rc == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("harness compare: error: ")
    assert "Traceback" not in stderr and stdout == ""
    assert not report.exists() and not js.exists()
    assert not report.parent.exists() or not any(report.parent.iterdir())
    return lines[0]


# --------------------------------------------------------------------------- the file


def test_file_missing(outputs, tmp_path):
    message = fails(tmp_path / "nope.csv", "y ~ x + (1 | g)", outputs, tmp_path)
    assert "nope.csv' does not exist" in message


def test_file_is_a_directory(outputs, tmp_path):
    message = fails(tmp_path, "y ~ x + (1 | g)", outputs, tmp_path)
    assert "is a directory, not a CSV file" in message


def test_file_is_not_text(outputs, tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"PK\x03\x04\x00\x00binary spreadsheet")
    assert "is not text" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)
    path.write_bytes("y,x,g\n1,2,caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_file_unreadable(outputs, tmp_path):
    path = write_csv(tmp_path / "data.csv", toy())
    path.chmod(0)
    try:
        assert "cannot read data file" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)
    finally:
        path.chmod(0o644)


def test_empty_file(outputs, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert "empty.csv' is empty" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)
    path.write_text("y,x,g\n")
    assert "has a header (y, x, g) but no rows" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)


def test_semicolon_separated_file_is_explained(outputs, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("y;x;g\n1;2;a\n")
    assert "separated by ';'" in fails(path, "y ~ x + (1 | g)", outputs, tmp_path)


# --------------------------------------------------------------------------- the columns


def test_formula_column_missing_lists_columns(outputs, tmp_path):
    message = fails(DATA / "dyestuff.csv", "Yield ~ temp + (1 | Batch)", outputs, tmp_path)
    assert "column(s) ['temp']" in message and "columns are ['Batch', 'Yield']" in message


def test_non_numeric_response(outputs, tmp_path):
    data = toy().assign(y=lambda d: np.where(d["x"] > 0, "high", "low"))
    message = fails(write_csv(tmp_path / "d.csv", data), "y ~ x + (1 | g)", outputs, tmp_path)
    assert "response 'y' must be numeric" in message and "gaussian" in message
    data = toy().assign(y=lambda d: d["x"] > 0)
    message = fails(write_csv(tmp_path / "d.csv", data), "y ~ x + (1 | g)", outputs, tmp_path)
    assert "logical (TRUE/FALSE)" in message and "non-gaussian family" in message


def test_all_nan_column(outputs, tmp_path):
    data = toy().assign(x=np.nan)
    message = fails(write_csv(tmp_path / "d.csv", data), "y ~ x + (1 | g)", outputs, tmp_path)
    assert "column 'x' has no non-missing values" in message


def test_grouping_factor_with_one_level(outputs, tmp_path):
    data = toy().assign(g="only")
    message = fails(write_csv(tmp_path / "d.csv", data), "y ~ x + (1 | g)", outputs, tmp_path)
    assert "grouping factor 'g' has only one level ('only')" in message


def test_too_many_random_effects_for_the_data(outputs, tmp_path):
    data = toy(n_groups=15, per=2)
    message = fails(write_csv(tmp_path / "d.csv", data), "y ~ x + (x | g)", outputs, tmp_path)
    assert "unidentifiable" in message


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("y ~ x + offset(x) + (1 | g)", "offset() terms are not supported"),
        ("cbind(y, x) ~ 1 + (1 | g)", "binomial model"),
        ("y ~ ns(x) + (1 | g)", "spline bases (ns) are not supported"),
        ("y ~ poly(x, 2) + (1 | g)", "poly() is not supported"),
        ("y ~ x + (1 | g", "unbalanced"),
        ("y ~ x", "no random-effect term"),
    ],
)
def test_out_of_scope_formulas(formula, message, outputs, tmp_path):
    csv = write_csv(tmp_path / "d.csv", toy())
    assert message in fails(csv, formula, outputs, tmp_path)


def test_unknown_prior_profile(outputs, tmp_path):
    csv = write_csv(tmp_path / "d.csv", toy())
    message = fails(csv, "y ~ x + (1 | g)", outputs, tmp_path, "--priors", "vague")
    assert "unknown prior profile 'vague'" in message


def test_debug_shows_the_traceback(tmp_path):
    from harness.cli import main

    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "compare", str(tmp_path / "nope.csv"), "--formula", "y ~ (1 | g)"])


# --------------------------------------------------------------------------- R missing


def test_r_missing_says_how_to_install(outputs, tmp_path):
    """A fresh interpreter in which rpy2 cannot be imported, as on a machine without R."""
    report, js = outputs
    code = (
        "import sys; sys.modules['rpy2'] = None; from harness.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "compare",
            str(DATA / "dyestuff.csv"),
            "--formula",
            DYESTUFF,
            "--out",
            str(report),
            "--json",
            str(js),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "rpy2 cannot start R" in lines[0]
    assert "r_scripts/install_r.sh" in lines[0] and "install.packages" in lines[0]
    assert not report.exists() and not js.exists()


# --------------------------------------------------------------------------- reported, not refused


def test_collinear_predictors_are_dropped_like_lme4():
    data = toy().assign(x2=lambda d: 2 * d["x"] + 1)
    design = build_design(ModelSpec("y ~ x + x2 + (1 | g)"), data)
    assert design.fixed_terms == ["(Intercept)", "x"] and design.dropped_columns == ["x2"]
    (note,) = [n for n in design.notes if "rank deficient" in n]
    assert "['x2']" in note and "dropped" in note


@pytest.mark.r
def test_collinear_predictors_lme4_drops_the_same_column():
    import harness as hz

    data = toy().assign(x2=lambda d: 2 * d["x"] + 1)
    freq = hz.fit_lme4(ModelSpec("y ~ x + x2 + (1 | g)"), data, n_sims=0)
    assert list(freq.fixed["term"]) == freq.design.fixed_terms == ["(Intercept)", "x"]
    # The harness's own note (lme4's wording of its message is not part of the promise).
    assert any("rank deficient" in m and "['x2']" in m for m in freq.messages)


@pytest.mark.r
def test_single_observation_group_with_random_slope():
    """lme4 fits it, so the harness fits it on both sides and says so."""
    import harness as hz
    from harness.engines.pymc import build_model

    data = toy(n_groups=8, per=6, seed=4)
    data.loc[0, "g"] = "alone"
    spec = ModelSpec("y ~ x + (1 + x | g)")
    freq = hz.fit_lme4(spec, data, n_sims=0)
    assert "alone" in set(freq.ranef["group"])
    assert any("single observation" in m and "alone" in m for m in freq.messages)
    model = build_model(freq.design)
    # Python-mode compilation: seconds, where a C build of the graph takes much longer.
    logp = model.compile_logp(mode="FAST_COMPILE")(model.initial_point())
    assert np.isfinite(logp)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """Dyestuff plus three rows with a missing Yield: dropped, counted, reported."""
    folder = tmp_path_factory.mktemp("nan")
    data = pd.read_csv(DATA / "dyestuff.csv")
    extra = pd.DataFrame({"Batch": ["A", "C", "F"], "Yield": [np.nan, np.nan, np.nan]})
    csv = write_csv(folder / "dyestuff_na.csv", pd.concat([data, extra], ignore_index=True))
    report, js = folder / "na.html", folder / "na.json"
    argv = [
        "compare",
        str(csv),
        "--formula",
        DYESTUFF,
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
def test_missing_values_are_dropped_and_counted(nan_run):
    rc, stdout, stderr, report, js = nan_run
    assert rc == 0, stderr
    assert "30 rows used (3 dropped)" in stdout
    payload = json.loads(js.read_text())
    data = payload["data"]
    assert (data["rows_read"], data["rows_used"], data["rows_dropped"]) == (33, 30, 3)
    assert any("3 row(s) with missing values dropped" in n for n in payload["notes"])
    assert "3 row(s) with missing values dropped" in report_text(report)
    # The cleaned data equal Dyestuff's: lme4's side is the reference's.
    fixed = {r["term"]: r["lme4_estimate"] for r in payload["tables"]["fixed"]}
    assert fixed == pytest.approx(MODELS["dyestuff"]["fixed"])


@pytest.mark.r
@pytest.mark.sampling
def test_too_few_draws_are_flagged_unreliable(tmp_path, tmp_path_factory):
    """20 draws per chain: the ESS cannot reach the threshold, so no verdict may pass."""
    report, js = tmp_path / "few.html", tmp_path / "few.json"
    argv = [
        "compare",
        str(DATA / "dyestuff.csv"),
        "--formula",
        DYESTUFF,
        "--out",
        str(report),
        "--json",
        str(js),
        "--seed",
        "3",
    ]
    env = {**QUICK, "HARNESS_DRAWS": "20", "HARNESS_TUNE": "50"}
    rc, _, stderr = run_cli(argv, shared_cache(tmp_path_factory), **env)
    assert rc == 0, stderr
    payload = json.loads(js.read_text())
    assert payload["verdict"] == "unreliable"
    verdicts = [r["verdict"] for t in ("fixed", "variance") for r in payload["tables"][t]]
    assert verdicts and set(verdicts) == {"unreliable"}
    assert payload["pymc"]["sampler_stats"]["min_ess_bulk"] < 400
    assert "unreliable" in report_text(report)


@pytest.mark.r
def test_singular_fit_is_reported_by_lme4():
    import harness as hz
    from tests.test_user_data import read_data

    freq = hz.fit_lme4(ModelSpec(DYESTUFF), read_data(DATA / "dyestuff2.csv"), n_sims=0)
    assert freq.singular is True
    assert any("singular fit" in m for m in freq.messages)
    sd = freq.variance.set_index("component").loc["Batch: sd((Intercept))", "estimate"]
    assert sd == 0


@pytest.mark.slow
@pytest.mark.r
@pytest.mark.sampling
def test_singular_fit_is_reported_on_both_sides(tmp_path, tmp_path_factory):
    """Dyestuff2 end to end: the JSON and the report say the fit is singular."""
    report, js = tmp_path / "d2.html", tmp_path / "d2.json"
    argv = [
        "compare",
        str(DATA / "dyestuff2.csv"),
        "--formula",
        DYESTUFF,
        "--out",
        str(report),
        "--json",
        str(js),
        "--seed",
        "3",
    ]
    rc, _, stderr = run_cli(argv, shared_cache(tmp_path_factory), **QUICK)
    assert rc == 0, stderr
    payload = json.loads(js.read_text())
    assert payload["lme4"]["singular"] is True
    assert any("singular" in m for m in payload["lme4"]["messages"])
    (batch,) = [r for r in payload["tables"]["variance"] if r["component"].startswith("Batch")]
    assert batch["lme4_estimate"] == 0
    assert "singular fit" in batch["note"]
    assert batch["pymc_median"] > 0  # the posterior does not sit on the boundary
    text = report_text(report)
    assert "singular" in text
