"""A new family touches the families' module and nothing else (issue 23).

``StubCount`` is defined here from :class:`~harness.model.family.Family`'s
interface alone, registered in :data:`~harness.model.family.FAMILIES` for the
test, and taken through everything a shipped family goes through: glmer
(R's Poisson family), PyMC, the Laplace identity, the comparison and every
figure of the report.  Nothing in the harness names it: a switch on a family's
name anywhere would fit, check or draw it as something else, or fail.
Its distribution is Poisson's, so glmer can fit it; its name, symbols and
labels are its own, and its likelihood is written here, not inherited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

from harness.model.family import FAMILIES, Family, get_family
from harness.model.spec import ModelSpec, build_design


class StubCount(Family):
    """Poisson counts under another name, every method written from the interface."""

    name = "stubcount"
    links = ("log",)
    default_link = "log"
    tex_mean = r"\nu"

    def r_family(self) -> tuple[str, str]:
        return "poisson", self.link.name

    def read_response(self, spec, frame):
        y = frame[spec.successes].to_numpy(dtype=float)
        if np.any(y < 0) or np.any(y != np.round(y)):
            raise ValueError(f"stub count {spec.successes!r} must hold non-negative whole numbers")
        return y, None

    def loglik(self, y, mu, trials):
        k = np.round(y)
        return special.xlogy(k, mu) - special.gammaln(k + 1) - mu

    def saturated_mu(self, y, trials):
        return y

    def variance(self, mu, trials):
        return mu

    def mean(self, eta, trials):
        return np.exp(eta)

    def score_weights(self, y, eta, trials):
        mu = np.exp(eta)
        return y - mu, mu

    def likelihood(self, pm, pt, name, eta, data, **kw):
        return pm.Poisson(name, mu=pt.exp(eta), observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        return float(np.log(max(float(np.mean(y)), 0.01))), 1.0

    def draw(self, rng, mu, trials=None, params=None):
        return rng.poisson(mu).astype(float)

    def response_label(self, response, trials, unit=""):
        return f"{response} (stub count)"

    def tex_distribution(self, response):
        return rf"{response}_i \sim \mathrm{{StubCount}}(\nu_i)"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> type[Family]:
    monkeypatch.setitem(FAMILIES, StubCount.name, StubCount)
    return StubCount


def _counts(seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(8), 5)
    x = np.tile(np.arange(5.0), 8)
    rate = np.exp(0.4 + 0.2 * x + rng.normal(0.0, 0.5, 8)[group])
    return pd.DataFrame({"y": rng.poisson(rate), "x": x, "g": [f"g{i}" for i in group]})


def test_unknown_family_is_refused_everywhere() -> None:
    """No fallback: a family that is not registered is an error, not Poisson."""
    with pytest.raises(ValueError, match="unknown family 'stubcount'"):
        get_family("stubcount")
    with pytest.raises(ValueError, match="unknown family"):
        ModelSpec("y ~ x + (1 | g)", family="stubcount")


def test_stub_family_builds_its_design_and_equations(stub: type[Family]) -> None:
    from harness.model.priors import resolve_priors
    from harness.report.page import model_equations

    data = _counts()
    design = build_design(ModelSpec("y ~ x + (1 | g)", family="stubcount"), data)
    assert isinstance(design.family, StubCount) and design.family.key == "stubcount(log)"
    assert design.trials is None and np.array_equal(design.y, data["y"].to_numpy(float))
    equations = design.family.equations(
        model_equations(design, resolve_priors(design)), design.response, False
    )
    text = " ".join(line for lines in equations.values() for line in lines)
    assert r"\mathrm{StubCount}" in text and r"\log(\mathbf{\nu})" in text
    assert r"\sigma" not in text
    with pytest.raises(ValueError, match="stub count"):
        build_design(
            ModelSpec("y ~ x + (1 | g)", family="stubcount"), data.assign(y=data["y"] - 0.5)
        )


@pytest.mark.r
@pytest.mark.sampling
def test_stub_family_is_fitted_compared_and_drawn(stub: type[Family], tmp_path: Path) -> None:
    from harness.pipeline.runner import fit_design
    from harness.pipeline.settings import FitSettings
    from harness.report.page import render_figures, write_report

    spec = ModelSpec("y ~ x + (1 | g)", family="stubcount", name="stub")
    settings = FitSettings(draws=150, tune=150, chains=2, n_sims=0, profile=False, max_rounds=1)
    result = fit_design(
        (spec, _counts()),
        seed=1,
        cache_dir=tmp_path / "cache",
        settings=settings,
        render=render_figures,
    )
    # Fitted by glmer with the family R knows, and by PyMC with the stub's likelihood.
    assert 'family = poisson(link = "log")' in result.freq.r_call
    assert result.bayes.design.family.key == "stubcount(log)"
    # The Laplace identity, computed from the stub's own likelihood and weights.
    assert result.same_model is not None and result.same_model.ok, result.same_model.reasons
    assert abs(result.same_model.difference) < 1e-6
    cmp = result.comparison
    assert list(cmp.fixed["term"]) == ["(Intercept)", "x"]
    assert "sigma" not in set(cmp.variance["kind"])
    assert np.all(np.abs(cmp.fixed["diff_in_se"]) < 1.5)
    page = write_report(result, tmp_path / "stub.html").read_text()
    assert "stubcount(log)" in page
    assert "could not be drawn" not in page  # every figure drawn, none a note
    # The predictive table is on the stub's plotted scale: the counts themselves.
    from harness.report import tables as rt

    pred = rt.predictive_table(cmp, result.bayes, result.design)
    assert np.array_equal(pred["y"], result.design.y)
    assert (pred["pymc_lower"] >= 0).all() and (pred["pymc_lower"] <= pred["pymc_upper"]).all()
