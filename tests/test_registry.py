"""Engines are a list: the registry, the pairs compared, and a registered engine run end to end."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checks.compare_bayes import BayesComparison
from harness.cli import build_parser
from harness.engines.registry import (
    ENGINES,
    Engine,
    EngineUnavailableError,
    UnknownEngineError,
    check_installed,
    comparison_pairs,
    get_engine,
    parse_engines,
    register,
    resolve_engines,
)
from harness.fits import BAYESIAN, FREQUENTIST, BayesFit, FreqFit
from harness.pipeline.runner import fit_design
from harness.pipeline.settings import FitSettings

#: The default test run's one small fit, shared through the session's disk cache
#: (tests/test_runner.py fits it with the same settings).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)


def _second_pymc(name: str, **changes: object) -> Engine:
    """PyMC registered under another name: an engine the runner has never heard of."""
    return dataclasses.replace(ENGINES["pymc"], name=name, label=name, **changes)


@pytest.fixture
def engines() -> Iterator[dict[str, Engine]]:
    """The registry (the same dict every module holds), restored after the test."""
    saved = dict(ENGINES)
    yield ENGINES
    ENGINES.clear()
    ENGINES.update(saved)


def test_fit_types_carry_their_kind() -> None:
    assert FreqFit.kind == FREQUENTIST and BayesFit.kind == BAYESIAN
    assert get_engine("lme4").kind == FREQUENTIST and get_engine("pymc").kind == BAYESIAN
    # The engines' modules still export the types they return.
    from harness.engines.lme4 import FreqFit as FromLme4
    from harness.engines.pymc import BayesFit as FromPymc

    assert FromLme4 is FreqFit and FromPymc is BayesFit


def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(
        UnknownEngineError, match="unknown engine 'stan'; known engines: lme4, pymc"
    ):
        get_engine("stan")
    with pytest.raises(UnknownEngineError, match="known engines: lme4, pymc"):
        parse_engines("lme4,stan")
    with pytest.raises(UnknownEngineError, match="no engine named"):
        parse_engines(" , ")


def test_engine_lists_are_checked() -> None:
    assert resolve_engines() == ("lme4", "pymc")
    assert parse_engines(" pymc , lme4 ") == ("lme4", "pymc")  # the reference first
    with pytest.raises(ValueError, match="more than once"):
        resolve_engines(["lme4", "pymc", "pymc"])
    with pytest.raises(ValueError, match="reference engine 'lme4' must be among"):
        resolve_engines(["pymc"])
    with pytest.raises(ValueError, match="at least two engines"):
        resolve_engines(["lme4"])


def test_pairs_are_against_the_reference_then_bayesian_against_bayesian(
    engines: dict[str, Engine],
) -> None:
    assert comparison_pairs(["lme4", "pymc"]) == [("lme4", "pymc")]
    register(_second_pymc("other"))
    assert comparison_pairs(["lme4", "pymc", "other"]) == [
        ("lme4", "pymc"),
        ("lme4", "other"),
        ("pymc", "other"),
    ]


def test_register_refuses_clashes(engines: dict[str, Engine]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(_second_pymc("pymc"))
    for bad in ("compare", "same_model", "figures", "not a name"):
        with pytest.raises(ValueError, match="cannot name an engine"):
            register(_second_pymc(bad))
    with pytest.raises(ValueError, match="kind must be"):
        register(_second_pymc("odd", kind="bootstrap"))


def test_an_engine_not_installed_is_refused_up_front(engines: dict[str, Engine]) -> None:
    register(_second_pymc("ghost", missing=lambda: "Python package 'ghost' not installed"))
    with pytest.raises(EngineUnavailableError, match="ghost: Python package 'ghost' not installed"):
        check_installed(["lme4", "pymc", "ghost"])
    check_installed(["lme4", "pymc"])  # this machine runs the tests' engines


def test_the_command_line_names_engines(
    engines: dict[str, Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    args = parser.parse_args(["compare", "x.csv", "--formula", "y ~ (1 | g)"])
    assert args.engines is None  # the API's default, lme4 and PyMC
    args = parser.parse_args(["report", "cafe", "--engines", "pymc,lme4"])
    assert args.engines == ("lme4", "pymc")
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "cafe", "--engines", "lme4,stan"])
    assert "unknown engine 'stan'; known engines: lme4, pymc" in capsys.readouterr().err
    register(_second_pymc("ghost", missing=lambda: "not installed"))
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["compare", "x.csv", "--formula", "y ~ (1 | g)", "--engines", "lme4,ghost"]
        )
    assert "ghost: not installed" in capsys.readouterr().err


def test_unknown_engine_is_refused_before_any_fit(tmp_path: Path) -> None:
    with pytest.raises(UnknownEngineError, match="known engines"):
        fit_design("sleepstudy", cache_dir=tmp_path, engines=["lme4", "stan"])
    assert not any(tmp_path.rglob("*.json"))


@pytest.mark.r
@pytest.mark.sampling
def test_a_registered_engine_runs_through_the_runner(
    engines: dict[str, Engine],
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A third engine, registered here only, is fitted, cached and compared like PyMC."""
    cache = tmp_path_factory.getbasetemp() / "harness-cache"  # shared with test_runner
    register(_second_pymc("pymc_again"))
    with caplog.at_level(logging.WARNING, logger="harness"):
        result = fit_design(
            "sleepstudy",
            seed=1,
            cache_dir=cache,
            settings=REPORT_SETTINGS,
            engines=["lme4", "pymc", "pymc_again"],
        )
    assert result.engines == ["lme4", "pymc", "pymc_again"]
    assert result.bayesian == ["pymc", "pymc_again"]
    assert set(result.comparisons) == {
        ("lme4", "pymc"),
        ("lme4", "pymc_again"),
        ("pymc", "pymc_again"),
    }
    assert result.comparisons[("lme4", "pymc_again")].engines == ("lme4", "pymc_again")
    assert result.comparison is result.comparisons[("lme4", "pymc")]
    # The two Bayesian fits are compared with each other in combined MCSE (compare_bayes).
    both = result.comparisons[("pymc", "pymc_again")]
    assert isinstance(both, BayesComparison) and both.engines == ("pymc", "pymc_again")
    assert list(both.table["row"][:2]) == list(result.comparison.fixed["term"])
    assert "no comparison" not in caplog.text
    assert result.keys["pymc_again"] != result.keys["pymc"]
    assert (cache / "pymc_again" / f"{result.keys['pymc_again']}.nc").is_file()
    again = fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=cache,
        settings=REPORT_SETTINGS,
        engines=["lme4", "pymc", "pymc_again"],
    )
    assert all(again.cached.values()), again.cached
    fixed = again.comparisons[("lme4", "pymc_again")].fixed
    assert list(fixed["term"]) == list(result.comparison.fixed["term"])
    assert again.fit("pymc_again").idata.posterior.sizes["draw"] == REPORT_SETTINGS.draws
    # The report's three-engine section and the JSON show the pair beside lme4 (no brms needed).
    from harness.report.page import render_report
    from harness.user_data import comparison_json

    html = render_report(again)
    label = get_engine("pymc_again").label
    assert 'id="three-engines"' in html and f"{label} mean" in html
    pairs = comparison_json(again)["bayes_pairs"]
    assert [p["engines"] for p in pairs] == [["pymc", "pymc_again"]]
    assert [r["row"] for r in pairs[0]["three_way"]][:2] == list(fixed["term"])


@pytest.mark.r
def test_an_engine_that_cannot_run_says_so(
    engines: dict[str, Engine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.getbasetemp() / "harness-cache"
    register(_second_pymc("ghost", missing=lambda: "Python package 'ghost' not installed"))
    with pytest.raises(EngineUnavailableError, match="engine 'ghost' cannot run here"):
        fit_design(
            "sleepstudy",
            seed=1,
            cache_dir=cache,
            settings=REPORT_SETTINGS,
            engines=["lme4", "ghost"],
        )
