"""Negative controls (issue 21): every verdict of the comparison can fail.

Each test breaks one thing in a real fit and checks that the verdict moves; the
unbroken fit (the same session fixtures test_core_sampling uses) keeps its verdict.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

import harness as hz
from harness.pipeline.runner import DesignResult

SAMPLING = [pytest.mark.r, pytest.mark.sampling]


def _copy(bayes):
    out = copy.copy(bayes)
    out.idata = bayes.idata.copy()
    out.settings = dict(bayes.settings)
    return out


@pytest.mark.r
@pytest.mark.sampling
def test_offsets_in_the_wrong_groups_fail(sleepstudy_freq, sleepstudy_bayes):
    good = hz.compare(sleepstudy_freq, sleepstudy_bayes)
    assert set(good.agreement["verdict"]) == {"pass"}
    assert good.agreement["explanation"].str.contains("E\\[E\\[u\\|y,theta\\]\\]").all()
    # Each subject's offsets handed to the next subject: a wrong mapping of groups.
    shuffled = _copy(sleepstudy_bayes)
    posterior = shuffled.idata.posterior
    for name in ("u_Subject", "z_Subject"):
        if name in posterior:
            posterior[name] = (posterior[name].dims, np.roll(posterior[name].values, 1, axis=2))
    bad = hz.compare(sleepstudy_freq, shuffled)
    assert set(bad.agreement["verdict"]) == {"fail"}
    assert bad.agreement["explanation"].str.contains("the offsets are not the model's").all()


@pytest.mark.r
@pytest.mark.sampling
def test_offsets_that_did_not_mix_are_unreliable(sleepstudy_freq, sleepstudy_bayes):
    stuck = _copy(sleepstudy_bayes)
    stuck.settings.pop("adaptive", None)  # judged on its own draws, as a non-adaptive fit
    posterior = stuck.idata.posterior
    values = posterior["u_Subject"].values.copy()
    values[0] += 3 * values.std(axis=(0, 1)).mean()  # one chain elsewhere
    posterior["u_Subject"] = (posterior["u_Subject"].dims, values)
    cmp = hz.compare(sleepstudy_freq, stuck)
    assert set(cmp.agreement["verdict"]) == {"unreliable"}
    assert cmp.agreement["explanation"].str.startswith("unreliable: R-hat").all()


@pytest.mark.parametrize(
    ("comparison", "same_model", "expected"),
    [
        ("pass", None, "incomplete"),
        ("look", None, "incomplete"),
        ("fail", None, "fail"),
        ("pass", SimpleNamespace(ok=True), "pass"),
        ("pass", SimpleNamespace(ok=False), "fail"),
    ],
)
def test_a_same_model_check_that_did_not_run_is_incomplete(comparison, same_model, expected):
    result = SimpleNamespace(
        comparisons={("lme4", "pymc"): SimpleNamespace(verdict=comparison)},
        same_model=same_model,
        same_model_bayes=None,
    )
    assert DesignResult.verdict.fget(result) == expected
