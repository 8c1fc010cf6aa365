"""Architecture (issue 22): an engine registered by a test alone runs through compare and the report.

The engine is defined here and nowhere else: a Bayesian engine whose fit is a real,
small PyMC fit with its own seed and draws, labelled as its own engine.  Registering
it is the only change made to the package; the runner fits and caches it, compares
it with lme4, and the HTML report and the JSON of ``harness compare`` name it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.engines.registry import ENGINES, Engine, FitRequest, register
from harness.fits import BAYESIAN, BayesFit, Fit
from harness.pipeline.runner import fit_design
from harness.pipeline.settings import FitSettings

pytestmark = [pytest.mark.r, pytest.mark.sampling]

#: The default test run's small fit of sleepstudy (tests/test_runner.py and
#: tests/test_report.py fit it with the same settings: lme4 and PyMC come from the
#: session's disk cache when those ran first).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)
NAME = "stubsampler"
LABEL = "Stub sampler"
STUB_DRAWS = 200


def _fit_stub(request: FitRequest) -> Fit:
    """A second, independent posterior: PyMC with another seed and fewer draws, one run."""
    from harness.engines.pymc import fit_pymc

    fit = fit_pymc(
        request.spec,
        request.data,
        seed=request.seed + 1000,
        draws=STUB_DRAWS,
        tune=STUB_DRAWS,
        chains=2,
        design=request.design,
        adaptive=False,
    )
    return dataclasses.replace(fit, engine=NAME, settings={**fit.settings, "stub": True})


STUB = Engine(
    name=NAME,
    kind=BAYESIAN,
    label=LABEL,
    fit=_fit_stub,
    settings_part=lambda settings, seed: {"draws": STUB_DRAWS, "seed": int(seed)},
    versions=lambda: {"stubsampler": "0.1"},
    code=("fits.py", "engines/pymc.py"),
)


def _module_bindings() -> dict[str, dict[str, int]]:
    """What every loaded harness module binds at its top level (name -> object id).

    Submodules are left out: importing one binds it in its package, which is the
    import system at work, not a change to the package.
    """
    return {
        name: {
            k: id(v)
            for k, v in vars(module).items()
            if not k.startswith("__") and not isinstance(v, types.ModuleType)
        }
        for name, module in list(sys.modules.items())
        if name == "harness" or name.startswith("harness.")
    }


@pytest.fixture
def stub_engine() -> Iterator[Engine]:
    """The stub registered for one test, and the registry exactly as it was afterwards."""
    saved = dict(ENGINES)
    register(STUB)
    yield STUB
    del ENGINES[NAME]
    assert ENGINES == saved and all(ENGINES[n] is saved[n] for n in saved)
    assert list(ENGINES) == list(saved)


def test_a_stub_engine_runs_through_compare_and_the_report(
    stub_engine: Engine, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from harness.report.page import render_figures
    from harness.user_data import write_outputs

    cache = tmp_path_factory.getbasetemp() / "harness-cache"  # shared with test_runner
    before = _module_bindings()
    result = fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=cache,
        settings=REPORT_SETTINGS,
        render=render_figures,
        engines=["lme4", "pymc", NAME],
    )
    # Fitted by the stub's own function (not a copy of the PyMC fit), cached under its name.
    stub = result.fit(NAME)
    assert isinstance(stub, BayesFit) and stub.engine == NAME and stub.settings["stub"]
    assert stub.idata.posterior.sizes["draw"] == STUB_DRAWS
    assert result.fit("pymc").idata.posterior.sizes["draw"] == REPORT_SETTINGS.draws
    assert (cache / NAME / f"{result.keys[NAME]}.json").is_file()
    # Compared with the reference like PyMC: the same rows, its own estimates.
    cmp = result.comparisons[("lme4", NAME)]
    assert cmp.engines == ("lme4", NAME)
    pymc_fixed = result.comparison.fixed
    assert list(cmp.fixed["term"]) == list(pymc_fixed["term"])
    # The Bayesian side's columns are still spelled pymc_*: the stub's own posterior is in them.
    stub_means = stub.idata.posterior["beta"].mean(("chain", "draw")).to_numpy()
    assert cmp.fixed["pymc_mean"].to_numpy() == pytest.approx(stub_means)
    assert not cmp.fixed["pymc_mean"].equals(pymc_fixed["pymc_mean"])  # another sample

    html_path, json_path = tmp_path / "sleepstudy.html", tmp_path / "sleepstudy.json"
    written = write_outputs(result, html_path, json_path)
    assert set(written) == {html_path, json_path}
    html = html_path.read_text(encoding="utf-8")
    assert f"{LABEL} ({NAME})" in html
    payload: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
    # The stub's fit is in the JSON's record of what was fitted now and what came from the cache.
    assert payload["cached"][NAME] is False

    # Registering was the only change: no module of the package rebinds or gains a name.
    after = _module_bindings()
    changed = {
        module: sorted(
            k for k in set(names) | set(after[module]) if names.get(k) != after[module].get(k)
        )
        for module, names in before.items()
    }
    assert not {m: c for m, c in changed.items() if c}
