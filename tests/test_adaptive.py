"""Adaptive sampling: rounds until the diagnostics hold, within a budget, reproducibly.

The hard model is a funnel: eight-schools-like data (8 groups of 2 rows, a
residual SD five times the between-group SD), started in the centred
parameterisation, which diverges there.  The loop must find the non-centred
form by its rule and reach the targets, or stop at a tiny budget and say why.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.engines.adaptive import (
    ODD_CHAIN_Z,
    AdaptiveSettings,
    chain_disagreement,
    concat_chains,
    diagnose,
    information_ratios,
    rhat_only,
    round_seed,
)
from harness.engines.pymc import build_model, centered_blocks, fit_pymc, structure_key
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, build_design
from harness.pipeline.settings import FitSettings, settings_from_args

FUNNEL = ModelSpec("y ~ 1 + (1 | school)", name="funnel")


def funnel_data(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    schools, per_school = 8, 2
    school = np.repeat([f"s{j}" for j in range(schools)], per_school)
    effect = np.repeat(rng.normal(0.0, 2.0, schools), per_school)
    y = 5.0 + effect + rng.normal(0.0, 10.0, schools * per_school)
    return pd.DataFrame({"y": y, "school": school})


def _rounds_without_time(record: dict) -> list[dict]:
    drop = {"sample_seconds", "compile_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in record["rounds"]]


# --------------------------------------------------------------------------- no sampling


def test_structure_key_differs_by_parameterisation_per_block():
    data, spec = hz.datasets.load("sleepstudy")
    spec = spec.with_(formula="Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)")
    design = build_design(spec, data)
    priors = resolve_priors(design)
    labels = [b.label for b in design.blocks]
    keys = {
        structure_key(design, priors),
        structure_key(design, priors, [labels[0]]),
        structure_key(design, priors, [labels[1]]),
        structure_key(design, priors, labels),
    }
    assert len(keys) == 4
    assert structure_key(design, priors, "all") == structure_key(design, priors, labels)
    with pytest.raises(ValueError, match="names no random-effects block"):
        centered_blocks(design, ["nope"])


def _jacobian_gap(design, block_value) -> float:
    """Centred log density minus non-centred at matching points, minus the Jacobian term."""
    priors = resolve_priors(design)
    labels = [b.label for b in design.blocks]
    plain = build_model(design, priors)
    centred = build_model(design, priors, labels)
    rng = np.random.default_rng(0)
    point = plain.initial_point()
    # Move the SDs / Cholesky factors and z off their initial values.
    point = {k: v + rng.normal(0.0, 0.3, size=np.shape(v)) for k, v in point.items()}
    nc_logp = plain.compile_logp()(point)
    outputs = [plain[f"u_{label}"] for label in labels]
    u_values = _evaluate(plain, outputs, point)
    c_point = {k: v for k, v in point.items() if not k.startswith("z_")}
    # beta's value variable is in the centred basis (the same in both models); beta itself:
    beta = dict(zip(design.fixed_terms, _evaluate(plain, plain["beta"], point), strict=True))
    taken: set[str] = set()
    by_label = dict(zip(labels, u_values, strict=True))
    # The centred block with the fewest groups that has a fixed term draws coef = u + beta_t
    # (a shift: Jacobian 1); other blocks draw u itself.
    for block in sorted(design.blocks, key=lambda b: (b.n_levels, design.blocks.index(b))):
        u = by_label[block.label]
        on_fixed = [t for t in block.terms if t in beta and t not in taken]
        taken.update(on_fixed)
        if on_fixed:
            shift = np.array([beta[t] if t in on_fixed else 0.0 for t in block.terms])
            c_point[f"coef_{block.label}"] = u + shift
        else:
            c_point[f"u_{block.label}"] = u
    c_logp = centred.compile_logp()(c_point)
    # u = z * sd (or z L'): log p_c(u) = log p_nc(z) - n_levels * sum(log diag of the scale).
    jacobian = sum(block_value(plain, point, b) for b in design.blocks)
    return float(c_logp - (nc_logp - jacobian))


def _evaluate(model, outputs, point):
    """Deterministics at a point of the value variables (the RVs replaced by their values)."""
    single = not isinstance(outputs, list)
    graphs = model.replace_rvs_by_values([outputs] if single else outputs)
    fn = model.compile_fn(graphs, inputs=model.value_vars, on_unused_input="ignore", point_fn=True)
    values = fn(point)
    return values[0] if single else values


def _log_scale(model, point, block) -> float:
    if block.correlated and block.n_terms > 1:
        chol = _evaluate(model, model[f"chol_{block.label}"], point)
        k = block.n_terms
        full = np.zeros((k, k))
        full[np.tril_indices(k)] = chol
        return block.n_levels * float(np.sum(np.log(np.diag(full))))
    sd = _evaluate(model, model[f"sd_{block.label}"], point)
    return block.n_levels * float(np.sum(np.log(sd)))


@pytest.mark.parametrize(
    "formula",
    [
        "Reaction ~ Days + (Days | Subject)",  # LKJ-correlated block: MvNormal with chol
        "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)",  # two diagonal blocks
        "Reaction ~ Days + (1 | Subject) + (1 | DaysF)",  # second intercept block centred on 0
    ],
)
def test_centred_and_non_centred_log_densities_match_up_to_the_jacobian(formula):
    data, spec = hz.datasets.load("sleepstudy")
    data = data.assign(DaysF=data["Days"].astype(str))
    design = build_design(spec.with_(formula=formula), data)
    assert abs(_jacobian_gap(design, _log_scale)) < 1e-8


def test_centred_model_keeps_the_names_downstream_code_reads():
    data, spec = hz.datasets.load("sleepstudy")
    design = build_design(spec, data)
    model = build_model(design, centered="all")
    names = set(model.named_vars)
    assert {"beta", "sigma", "sd_Subject", "corr_Subject", "u_Subject", "coef_Subject"} <= names
    assert "z_Subject" not in names
    assert model.named_vars_to_dims["u_Subject"] == ("Subject__level", "Subject__term")


def test_round_seeds_are_derived_deterministically():
    assert round_seed(7, 1) == 7
    assert round_seed(7, 2) == round_seed(7, 2) != round_seed(7, 3)
    assert round_seed(7, 2) != round_seed(8, 2)


def test_settings_enter_the_cache_key_and_come_from_the_command_line(monkeypatch):
    monkeypatch.delenv("HARNESS_MAX_ROUNDS", raising=False)
    base = FitSettings()
    assert base.adaptive and base.pymc_part()["max_rounds"] == 4
    assert FitSettings(max_rounds=2).pymc_part() != base.pymc_part()
    args = argparse.Namespace(max_rounds=2, max_draws=8000, max_seconds=60.0, no_adaptive=False)
    settings = settings_from_args(args, base)
    assert settings.adaptive_settings() == AdaptiveSettings(
        max_rounds=2, max_draws=8000, max_seconds=60.0
    )
    off = settings_from_args(argparse.Namespace(no_adaptive=True), base)
    assert off.adaptive_settings() is False
    with pytest.raises(ValueError, match="--max-rounds must be positive"):
        settings_from_args(argparse.Namespace(max_rounds=0), base)
    with pytest.raises(ValueError, match="max_rounds must be at least 1"):
        AdaptiveSettings(max_rounds=0)
    monkeypatch.setenv("HARNESS_MAX_ROUNDS", "1")
    from harness.pipeline.settings import settings_from_env

    assert settings_from_env().max_rounds == 1


# --------------------------------------------------------------------------- the funnel


@pytest.fixture(scope="module")
def funnel_fits():
    data = funnel_data()
    fits = {
        "adaptive": fit_pymc(FUNNEL, data, seed=11, centered="all"),
        "again": fit_pymc(FUNNEL, data, seed=11, centered="all"),
        "tiny": fit_pymc(
            FUNNEL, data, seed=11, centered="all", adaptive=AdaptiveSettings(max_rounds=1)
        ),
        "single": fit_pymc(FUNNEL, data, seed=11, centered="all", adaptive=False),
    }
    return data, fits


@pytest.mark.sampling
def test_funnel_reaches_the_targets_by_switching_parameterisation(funnel_fits):
    _, fits = funnel_fits
    single, fit = fits["single"], fits["adaptive"]
    assert single.n_divergent > 0  # the centred funnel diverges in one run
    record = fit.settings["adaptive"]
    json.dumps(record, allow_nan=False)  # plain JSON values only
    assert record["reliable"] and not record["budget_spent"]
    rounds = record["rounds"]
    assert rounds[0]["parameterization"] == {"school": "centred"}
    assert rounds[0]["after"]["divergences"] == single.n_divergent
    assert rounds[1]["action"] == "re-parameterise"
    assert rounds[1]["parameterization"] == {"school": "non-centred"}
    assert rounds[1]["evidence"]["school"]["min_eigenvalue"] < 1
    assert rounds[1]["before"] == rounds[0]["after"]
    final = rounds[-1]["after"]
    assert final["ok"] and final["divergences"] == 0
    assert final["max_r_hat"] <= 1.01 and min(final["min_ess_bulk"], final["min_ess_tail"]) >= 400
    assert fit.n_divergent == 0
    assert fit.settings["centered"] == []
    # Downstream names are unchanged: the offsets are there, under lme4's labels.
    assert list(fit.idata.posterior["u_school"].coords["school__level"].values) == [
        f"s{j}" for j in range(8)
    ]
    # The diagnosis of the returned draws is the last round's.
    assert diagnose(fit.idata, fit.design, AdaptiveSettings())["ok"]


@pytest.mark.sampling
def test_tiny_budget_stops_with_the_reason(funnel_fits):
    _, fits = funnel_fits
    record = fits["tiny"].settings["adaptive"]
    assert len(record["rounds"]) == 1
    assert record["budget_spent"] and not record["reliable"]
    assert record["reason"].startswith("budget spent: 1 rounds")
    assert "divergences" in record["reason"] and "re-parameterise" in record["reason"]
    # A one-round adaptive fit is the single run, draw for draw.
    np.testing.assert_array_equal(
        fits["tiny"].idata.posterior["beta"].values, fits["single"].idata.posterior["beta"].values
    )


@pytest.mark.sampling
def test_same_seed_same_rounds_and_draws(funnel_fits):
    _, fits = funnel_fits
    a, b = fits["adaptive"], fits["again"]
    assert _rounds_without_time(a.settings["adaptive"]) == _rounds_without_time(
        b.settings["adaptive"]
    )
    for name in ("beta", "sigma", "sd_school", "u_school"):
        np.testing.assert_array_equal(
            a.idata.posterior[name].values, b.idata.posterior[name].values
        )


@pytest.mark.sampling
def test_information_ratio_is_data_over_prior_precision(funnel_fits):
    _, fits = funnel_fits
    fit = fits["adaptive"]
    post = fit.idata.posterior
    sigma = float(post["sigma"].median())
    tau = float(post["sd_school"].median())
    expected = 2 / sigma**2 * tau**2  # two rows per school
    got = information_ratios(fit.idata, fit.design)["school"]
    assert got["terms"]["(Intercept)"] == pytest.approx(expected, rel=1e-9)
    assert got["min_eigenvalue"] == pytest.approx(expected, rel=1e-9)  # one term: the same


def test_information_ratio_sees_collinear_columns():
    """Orthodont-like: an intercept at age 0 with ages 8-14 is informed far less than n_j says."""
    import arviz as az

    rng = np.random.default_rng(0)
    age = np.tile([8.0, 10.0, 12.0, 14.0], 10)
    subject = np.repeat([f"s{j}" for j in range(10)], 4)
    data = pd.DataFrame({"y": rng.normal(size=40), "age": age, "subject": subject})
    design = build_design(ModelSpec("y ~ age + (age | subject)"), data)
    label = design.blocks[0].label
    shape = (2, 10)
    posterior = {
        "sigma": np.full(shape, 1.0),
        f"sd_{label}": np.broadcast_to([2.0, 0.2], (*shape, 2)).copy(),
        f"corr_{label}": np.broadcast_to(np.eye(2), (*shape, 2, 2)).copy(),
    }
    idata = az.from_dict(posterior=posterior)
    ratio = information_ratios(idata, design)[label]
    assert ratio["terms"]["(Intercept)"] == pytest.approx(4 * 2.0**2)  # 16: "strong"
    z = np.column_stack([np.ones(4), [8.0, 10.0, 12.0, 14.0]])
    root = np.diag([2.0, 0.2])
    expected = np.linalg.eigvalsh(root @ z.T @ z @ root)[0]
    assert ratio["min_eigenvalue"] == pytest.approx(expected)
    assert ratio["min_eigenvalue"] < 0.5 * min(ratio["terms"].values())


def test_added_chains_are_concatenated_after_the_kept_ones():
    import arviz as az

    rng = np.random.default_rng(1)
    first = az.from_dict(
        posterior={"x": rng.normal(size=(2, 50))},
        sample_stats={"diverging": np.zeros((2, 50), bool)},
    )
    second = az.from_dict(
        posterior={"x": rng.normal(size=(3, 50))},
        sample_stats={"diverging": np.zeros((3, 50), bool)},
    )
    joined = concat_chains(first, second)
    assert list(joined.posterior.chain.values) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(joined.posterior["x"].values[2:], second.posterior["x"].values)
    assert joined.sample_stats.sizes["chain"] == 5


def _diag(r_hat: float, bulk: float, tail: float, divergences: int = 0) -> dict:
    settings = AdaptiveSettings()
    ok = r_hat <= settings.rhat_max and min(bulk, tail) >= settings.ess_min and not divergences
    return {
        "ok": ok,
        "max_r_hat": r_hat,
        "min_ess_bulk": bulk,
        "min_ess_tail": tail,
        "divergences": divergences,
    }


def test_a_chain_that_sampled_elsewhere_is_scored_and_triggers_a_restart_not_more_chains():
    import arviz as az

    rng = np.random.default_rng(7)
    draws = rng.normal(size=(4, 1000))
    draws[2] += 0.3  # one chain settled elsewhere: ~9 standard errors of its mean
    scores = chain_disagreement(draws)
    assert int(np.argmax(np.abs(scores))) == 2
    assert scores[2] > ODD_CHAIN_Z
    assert max(abs(z) for k, z in enumerate(scores) if k != 2) < scores[2] - 2.0
    # The signature: R-hat fails although ESS is far above the target.
    r_hat = float(az.rhat(draws))
    bulk = float(az.ess(draws, method="bulk"))
    tail = float(az.ess(draws, method="tail"))
    assert r_hat > 1.01 and min(bulk, tail) > 400
    settings = AdaptiveSettings()
    assert rhat_only(_diag(r_hat, bulk, tail), settings)
    # Too few draws, divergences, or nothing failing: not this remedy.
    assert not rhat_only(_diag(1.02, 250.0, 900.0), settings)
    assert not rhat_only(_diag(1.02, 900.0, 900.0, divergences=3), settings)
    assert not rhat_only(_diag(1.005, 900.0, 900.0), settings)
    # Chains that agree (slow mixing, not a stray chain) stay under the threshold.
    calm = chain_disagreement(rng.normal(size=(8, 1000)))
    assert max(abs(z) for z in calm) < ODD_CHAIN_Z


def test_max_tune_factor_must_be_at_least_one():
    with pytest.raises(ValueError, match="max_tune_factor"):
        AdaptiveSettings(max_tune_factor=0)


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.sampling
@pytest.mark.parametrize(
    "formula",
    [
        "Reaction ~ Days + (Days | Subject)",
        "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)",
    ],
)
def test_centred_and_non_centred_give_the_same_posterior(formula):
    data, spec = hz.datasets.load("sleepstudy")
    spec = spec.with_(formula=formula)
    plain = fit_pymc(spec, data, seed=3, adaptive=False)
    centred = fit_pymc(spec, data, seed=4, adaptive=False, centered="all")
    assert plain.n_divergent == 0 and centred.n_divergent == 0
    import arviz as az

    for fit in (plain, centred):
        assert float(az.rhat(fit.idata.posterior[["beta"]])["beta"].max()) < 1.02
    for name in ["beta", "sigma"] + [f"sd_{b.label}" for b in plain.design.blocks]:
        a = plain.idata.posterior[name]
        b = centred.idata.posterior[name]
        mean_a = a.mean(("chain", "draw")).values
        mean_b = b.mean(("chain", "draw")).values
        mcse_a = az.mcse(a.to_dataset(name="x"))["x"].values
        mcse_b = az.mcse(b.to_dataset(name="x"))["x"].values
        mcse = np.sqrt(mcse_a**2 + mcse_b**2).ravel()
        assert np.all(np.abs(mean_a - mean_b).ravel() < 5 * mcse), name
    ua = plain.idata.posterior[f"u_{plain.design.blocks[0].label}"].mean(("chain", "draw"))
    ub = centred.idata.posterior[f"u_{plain.design.blocks[0].label}"].mean(("chain", "draw"))
    sd = plain.idata.posterior[f"u_{plain.design.blocks[0].label}"].std(("chain", "draw"))
    assert float((np.abs(ua - ub) / sd).max()) < 0.25


def test_rounds_table_for_the_report_names_the_worst_quantities(funnel_fits):
    from harness.report.tables import adaptive_rounds_table

    _, fits = funnel_fits
    table = adaptive_rounds_table(fits["adaptive"].settings["adaptive"])
    assert list(table["action"])[:2] == ["first run", "re-parameterise"]
    assert table["parameterization"].iloc[0] == "school: centred"
    first = fits["adaptive"].settings["adaptive"]["rounds"][0]["after"]
    assert table["max_r_hat"].iloc[0] == (
        f"{first['max_r_hat']:.3f} ({first['max_r_hat_quantity']})"
    )
    assert table["divergences"].iloc[0] > 0
    assert adaptive_rounds_table(None).empty
