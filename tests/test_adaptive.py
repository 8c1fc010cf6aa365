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
from harness.checks.marginal import compile_mode
from harness.engines.adaptive import (
    ODD_CHAIN_Z,
    AdaptiveSettings,
    chain_disagreement,
    concat_chains,
    diagnose,
    divergence_check_length,
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
    # Evaluated at one point: the checks' NumPy mode, not a C compile of every node.
    nc_logp = plain.compile_logp(mode=compile_mode())(point)
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
    c_logp = centred.compile_logp(mode=compile_mode())(c_point)
    # u = z * sd (or z L'): log p_c(u) = log p_nc(z) - n_levels * sum(log diag of the scale).
    jacobian = sum(block_value(plain, point, b) for b in design.blocks)
    return float(c_logp - (nc_logp - jacobian))


def _evaluate(model, outputs, point):
    """Deterministics at a point of the value variables (the RVs replaced by their values)."""
    single = not isinstance(outputs, list)
    graphs = model.replace_rvs_by_values([outputs] if single else outputs)
    fn = model.compile_fn(
        graphs,
        inputs=model.value_vars,
        on_unused_input="ignore",
        point_fn=True,
        mode=compile_mode(),
    )
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
    assert base.adaptive and base.pymc_part()["max_rounds"] == 8
    assert base.pymc_part()["max_seconds"] is None  # counted budgets only: one result anywhere
    assert FitSettings(max_seconds=60.0).pymc_part() != base.pymc_part()
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
    # The first run stopped at its first divergent stretch: a prefix of the single run.
    first_draws = rounds[0]["draws"]
    assert first_draws == divergence_check_length(1000) < 1000
    assert "stopped after 250 of 1000 draws per chain" in rounds[0]["why"]
    diverging = single.idata.sample_stats["diverging"].values
    assert rounds[0]["after"]["divergences"] == int(diverging[:, :first_draws].sum()) > 0
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
    # The centred form of a correlated slope leaves a stray divergence now and then at 0.9 and
    # 0.95 (seed 4: one); biased draws would make the comparison below test the sampler, not
    # the parameterisation, so both forms run at the loop's top step, target_accept 0.99.
    plain = fit_pymc(spec, data, seed=3, adaptive=False, target_accept=0.99)
    centred = fit_pymc(spec, data, seed=4, adaptive=False, centered="all", target_accept=0.99)
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


# --------------------------------------------------------------------------- the loop's order


def _fake_design():
    """Two crossed intercept blocks: ``g`` with 2 levels, ``h`` with 8; 3 rows per cell."""
    g = np.repeat(["g1", "g2"], 24)
    h = np.tile(np.repeat([f"h{j}" for j in range(8)], 3), 2)
    y = np.random.default_rng(0).normal(size=48)
    data = pd.DataFrame({"y": y, "g": g, "h": h})
    return build_design(ModelSpec("y ~ 1 + (1 | g) + (1 | h)", name="fake"), data)


def _chains(rng, chains: int, draws: int, rho: float, shift: dict[int, float]) -> np.ndarray:
    """AR(1) chains of unit marginal variance (``rho`` 0: independent draws), some shifted."""
    noise = rng.normal(size=(chains, draws))
    out = np.empty_like(noise)
    out[:, 0] = noise[:, 0]
    for t in range(1, draws):
        out[:, t] = rho * out[:, t - 1] + np.sqrt(1 - rho**2) * noise[:, t]
    for chain, by in shift.items():
        out[chain] += by
    return out


class FakeSampler:
    """``sample_once`` stand-in: draws whose mixing, stray chains and divergences follow ``behave``.

    ``behave(call)`` gets the run's keyword arguments and returns a dict with
    ``rho`` (AR(1) coefficient), ``beta_rho`` (the same for ``beta`` alone), ``shift`` ({chain: shift in posterior SDs}),
    ``divergences`` (count; their draws have a small SD of block ``g``) and
    ``seconds`` (the sampling time the run claims).
    """

    def __init__(self, design, behave):
        self.design, self.behave, self.calls = design, behave, []

    def __call__(self, design, priors, **kw):
        import arviz as az

        from harness.engines.pymc import Run
        from harness.names import level_dim, term_dim

        self.calls.append(kw)
        how = {"rho": 0.0, "shift": {}, "divergences": 0, "seconds": 1.0, **self.behave(kw)}
        how.setdefault("beta_rho", how["rho"])
        rng = np.random.default_rng(kw["seed"])
        c, n = kw["chains"], kw["draws"]

        def q(rho=how["rho"]):
            return _chains(rng, c, n, rho, how["shift"])

        diverging = np.zeros((c, n), bool)
        diverging.flat[: how["divergences"]] = True
        posterior = {"beta": q(how["beta_rho"])[..., None], "sigma": 10.0 + 0.1 * q()}
        dims = {"beta": ["fixed_term"]}
        coords = {"fixed_term": list(design.fixed_terms)}
        for block in design.blocks:
            log_sd = 0.3 * q()
            if block.label == "g":
                log_sd[diverging] = -3.0  # the divergent draws sit in g's funnel neck
            posterior[f"sd_{block.label}"] = np.exp(log_sd)[..., None]
            posterior[f"u_{block.label}"] = np.stack([q() for _ in block.levels], -1)[..., None]
            dims[f"sd_{block.label}"] = [term_dim(block)]
            dims[f"u_{block.label}"] = [level_dim(block), term_dim(block)]
            coords[level_dim(block)] = list(block.levels)
            coords[term_dim(block)] = list(block.terms)
        stats = {"diverging": diverging, "n_steps": np.full((c, n), 7)}
        idata = az.from_dict(posterior=posterior, sample_stats=stats, coords=coords, dims=dims)
        centered = frozenset(kw["centered"])
        return Run(
            idata,
            0.0,
            how["seconds"],
            True,
            "key",
            {},
            centered,
            kw["target_accept"],
            kw["seed"],
            c,
        )


def _loop(behave, settings=None, clock=None, sampler="nutpie", **first):
    from harness.engines.adaptive import sample_adaptively

    design = _fake_design()
    fake = FakeSampler(design, behave)
    args = {"seed": 5, "draws": 300, "tune": 300, "chains": 4, "target_accept": 0.9, **first}
    extra = {"clock": clock} if clock is not None else {}
    outcome = sample_adaptively(
        design,
        resolve_priors(design),
        sampler=sampler,
        settings=settings,
        sample_once=fake,
        **args,
        **extra,
    )
    return outcome, fake


def _actions(outcome) -> list[str]:
    return [r["action"] for r in outcome.record["rounds"]]


def test_slow_mixing_restarts_with_longer_chains_before_adding_any():
    # Chains that agree but mix slowly until they are twice as long (and warmed up twice as long).
    # (PyMC's sampler: nutpie would first try its low-rank mass matrix, tested below.)
    outcome, _ = _loop(lambda kw: {"rho": 0.0 if kw["draws"] >= 600 else 0.95}, sampler="pymc")
    rounds = outcome.record["rounds"]
    first = rounds[0]["after"]
    assert first["max_r_hat"] > 1.01 and first["divergences"] == 0
    z = rounds[1]["evidence"]["chain_disagreement"]["chain_z"]
    assert max(abs(v) for v in z) <= ODD_CHAIN_Z  # no stray chain: slow mixing
    assert _actions(outcome) == ["first run", "restart with longer chains"]
    assert (rounds[1]["draws"], rounds[1]["tune"], rounds[1]["chains"]) == (600, 600, 4)
    assert outcome.record["reliable"] and outcome.record["final"]["draws"] == 600
    assert outcome.idata.posterior.sizes["chain"] == 4  # replaced, not pooled
    assert outcome.record["iterations_sampled"] == 4 * 600 + 4 * 1200


def test_a_stray_chain_gets_a_longer_warm_up():
    # Chain 2 settles elsewhere until the warm-up is doubled.
    outcome, _ = _loop(lambda kw: {"shift": {} if kw["tune"] >= 600 else {2: 0.6}})
    rounds = outcome.record["rounds"]
    assert _actions(outcome) == ["first run", "restart with longer warm-up"]
    z = rounds[1]["evidence"]["chain_disagreement"]["chain_z"]
    assert int(np.argmax(np.abs(z))) == 2 and abs(z[2]) > ODD_CHAIN_Z
    assert (rounds[1]["tune"], rounds[1]["draws"]) == (600, 300)
    assert outcome.record["reliable"]


def test_short_ess_with_rhat_holding_buys_the_cheaper_draws():
    # The fixed effect's ESS a little short (AR(1) 0.84: ~390 of 4000), R-hat well inside
    # its target: two more chains cost less than replacing all four by longer ones.
    outcome, _ = _loop(lambda kw: {"beta_rho": 0.84}, draws=1000, seed=3)
    rounds = outcome.record["rounds"]
    first = rounds[0]["after"]
    assert first["max_r_hat"] <= 1.005 and min(first["min_ess_bulk"], first["min_ess_tail"]) < 400
    assert rounds[1]["action"] == "add chains"
    evidence = rounds[1]["evidence"]
    assert evidence["add_iterations"] < evidence["longer_iterations"] and evidence["rhat_room"]
    assert rounds[1]["chains"] < 4
    assert outcome.record["reliable"]
    assert outcome.idata.posterior.sizes["chain"] == 4 + rounds[1]["chains"]


def test_short_ess_with_rhat_near_its_target_gets_longer_chains_not_more():
    # As above, but R-hat 1.009: chains of the same length would keep that noise.
    outcome, _ = _loop(lambda kw: {"beta_rho": 0.8}, draws=800, seed=1, sampler="pymc")
    rounds = outcome.record["rounds"]
    first = rounds[0]["after"]
    assert 1.005 < first["max_r_hat"] <= 1.01  # R-hat holds, but with no room to spare
    assert first["min_ess_bulk"] < 400  # and ESS is short
    assert _actions(outcome) == ["first run", "restart with longer chains"]
    assert not rounds[1]["evidence"]["rhat_room"] and rounds[1]["draws"] > 800
    assert outcome.record["reliable"]


@pytest.mark.parametrize("cured_by_centring", [True, False])
def test_divergences_raise_target_accept_then_try_the_other_geometry(cured_by_centring):
    def behave(kw):
        cured = cured_by_centring and "g" in kw["centered"]
        return {"divergences": 0 if cured else 5}

    outcome, _ = _loop(behave)
    record = outcome.record
    assert _actions(outcome)[:4] == [
        "first run",
        "raise target_accept",
        "raise target_accept",
        "other geometry",
    ]
    assert [r["target_accept"] for r in record["rounds"][:4]] == [0.9, 0.95, 0.99, 0.99]
    other = record["rounds"][3]
    # Only the block the divergent draws point at changes form.
    assert other["parameterization"] == {"g": "centred", "h": "non-centred"}
    located = other["evidence"]["divergence_blocks"]
    assert located["g"]["z"] > located["h"]["z"] and located["g"]["levels"] == 2
    if cured_by_centring:
        assert record["reliable"] and record["final"]["parameterization"]["g"] == "centred"
        return
    assert not record["reliable"] and not record["budget_spent"]
    reason = record["reason"]
    assert reason.startswith("no remedy left: 5 divergences")
    assert "centred and non-centred forms" in reason
    assert "block 'g' has 2 levels" in reason
    assert "its SD is barely identified by the data" in reason
    assert reason.endswith("5 divergences left")
    assert "'h'" not in reason


def test_the_budget_in_draws_gives_one_result_at_any_speed():
    """A fast and a slow (or busy) machine: the same rounds, draws and verdict."""

    def clock_of(step):
        now = [0.0]

        def clock():
            now[0] += step
            return now[0]

        return clock

    def behave(seconds):
        return lambda kw: {
            "divergences": 0 if kw["target_accept"] >= 0.99 else 3,
            "seconds": seconds,
        }

    fast, _ = _loop(behave(0.5), clock=clock_of(0.01))
    slow, _ = _loop(behave(900.0), clock=clock_of(400.0))
    assert _rounds_without_time(fast.record) == _rounds_without_time(slow.record)
    assert fast.record["reason"] == slow.record["reason"] and fast.record["reliable"]
    np.testing.assert_array_equal(
        fast.idata.posterior["beta"].values, slow.idata.posterior["beta"].values
    )
    assert AdaptiveSettings().max_seconds is None
    # A wall-time cap stays available to the user, and then the slow machine stops early.
    capped = AdaptiveSettings(max_seconds=600.0)
    stopped, _ = _loop(behave(900.0), settings=capped, clock=clock_of(400.0))
    assert stopped.record["budget_spent"] and "max_seconds 600" in stopped.record["reason"]
    done, _ = _loop(behave(0.5), settings=capped, clock=clock_of(0.01))
    assert done.record["reliable"]


def test_the_default_draws_budget_stops_the_loop_by_count():
    outcome, fake = _loop(lambda kw: {"divergences": 2})
    record = outcome.record
    assert record["settings"]["max_draws"] == 6 * 4 * 300
    assert record["draws_sampled"] <= record["settings"]["max_draws"]
    assert sum(c["chains"] * c["draws"] for c in fake.calls) == record["draws_sampled"]


def test_slow_mixing_whose_longer_chains_diverge_tries_the_other_geometry():
    # Longer chains diverge (so the earlier draws are kept); then the block of the worst
    # quantity (every block, for a fixed effect or sigma) changes form, which cures it.
    def behave(kw):
        if kw["centered"]:
            return {}
        return {"rho": 0.95, "divergences": 4 if kw["draws"] > 300 else 0}

    outcome, _ = _loop(behave, sampler="pymc")
    rounds = outcome.record["rounds"]
    assert _actions(outcome) == ["first run", "restart with longer chains", "other geometry"]
    assert not rounds[1]["kept"] and "samples worse" in rounds[1]["why"]
    worst = rounds[2]["evidence"]["chain_disagreement"]["quantity"]
    block = worst.split("[")[0].split("_", 1)[1] if worst.startswith(("u_", "sd_")) else None
    expected = {b: "centred" if block in (None, b) else "non-centred" for b in ("g", "h")}
    assert rounds[2]["parameterization"] == expected
    assert outcome.record["reliable"]


def test_longer_chains_that_diverge_are_retried_at_a_higher_target_accept():
    # Longer chains diverge at the first target_accept, the other geometry diverges more:
    # divergences call for a smaller step, so the longer chains are retried one step higher
    # (a mixing problem is not left unsolved because one remedy's run diverged).
    def behave(kw):
        if kw["centered"]:
            return {"rho": 0.95, "divergences": 40}
        if kw["draws"] > 300:
            return {"divergences": 4 if kw["target_accept"] < 0.95 else 0}
        return {"rho": 0.95}

    outcome, _ = _loop(behave, settings=AdaptiveSettings(max_draws=20_000), sampler="pymc")
    rounds = outcome.record["rounds"]
    assert _actions(outcome) == [
        "first run",
        "restart with longer chains",
        "other geometry",
        "restart with longer chains",
    ]
    assert [r["kept"] for r in rounds] == [True, False, False, True]
    assert rounds[3]["target_accept"] == 0.95
    assert "diverged at 0.9" in rounds[3]["why"]
    assert outcome.record["reliable"]


def test_slow_mixing_tries_the_low_rank_mass_matrix_first():
    # Parameters that move together: nutpie's low-rank mass matrix cures it in one run of
    # the same length (cheaper than chains twice as long); the record says which matrix.
    outcome, fake = _loop(lambda kw: {"rho": 0.0 if kw.get("low_rank") else 0.95})
    assert _actions(outcome) == ["first run", "low-rank mass matrix"]
    rounds = outcome.record["rounds"]
    assert [r["mass_matrix"] for r in rounds] == ["diagonal", "low-rank"]
    assert rounds[1]["draws"] == rounds[0]["draws"] and rounds[1]["tune"] == rounds[0]["tune"]
    assert outcome.record["final"]["mass_matrix"] == "low-rank"
    assert outcome.record["reliable"]
    assert "low_rank" not in fake.calls[0] and fake.calls[1]["low_rank"] is True


def test_a_low_rank_run_that_samples_worse_is_not_kept():
    # The low-rank run diverges: the diagonal draws are kept, and slow mixing gets longer
    # chains (with the diagonal mass matrix) as without it.
    def behave(kw):
        if kw.get("low_rank"):
            return {"rho": 0.95, "divergences": 3}
        return {"rho": 0.0 if kw["draws"] >= 600 else 0.95}

    outcome, fake = _loop(behave)
    assert _actions(outcome) == [
        "first run",
        "low-rank mass matrix",
        "restart with longer chains",
    ]
    rounds = outcome.record["rounds"]
    assert [r["kept"] for r in rounds] == [True, False, True]
    assert "low_rank" not in fake.calls[2]
    assert outcome.record["final"]["mass_matrix"] == "diagonal"
    assert outcome.record["reliable"]


def test_when_longer_chains_would_pass_the_budget_cheaper_added_chains_run_instead():
    # As above (R-hat 1.009, ESS short), but the draws budget leaves room for added chains
    # only: they run (their pooled R-hat is checked again) rather than the loop stopping.
    first = 4 * 800
    outcome, fake = _loop(
        lambda kw: {"beta_rho": 0.8},
        settings=AdaptiveSettings(max_draws=first + 2 * 800),
        draws=800,
        seed=1,
        sampler="pymc",
    )
    rounds = outcome.record["rounds"]
    assert _actions(outcome)[:2] == ["first run", "add chains"]
    assert "would pass the draws budget" in rounds[1]["why"]
    assert fake.calls[1]["draws"] == 800 and fake.calls[1]["chains"] <= 2
    assert outcome.record["draws_sampled"] <= first + 2 * 800


def test_a_run_that_cannot_start_is_a_round_not_kept_and_the_loop_goes_on():
    # nutpie panics once (no valid initial point): the round is recorded as failed, the
    # earlier draws stay, and the loop goes on to a run that works.
    from harness.engines.samplers import SamplerFailed

    failures = []

    def behave(kw):
        if kw["target_accept"] >= 0.95 and not failures:
            failures.append(kw)
            raise SamplerFailed("nutpie stopped: bad initial gradient")
        return {"divergences": 0 if kw["target_accept"] >= 0.95 else 2}

    outcome, _ = _loop(behave)
    rounds = outcome.record["rounds"]
    failed = [r for r in rounds if "sampler failed" in r["why"]]
    assert failed and not failed[0]["kept"] and failed[0]["iterations"] == 0
    assert _actions(outcome).count("raise target_accept") >= 2
    assert outcome.record["reliable"]


# --------------------------------------------------------------------------- continued chains


class FakeChains:
    """``ExtendableChains`` stand-in: one fake run drawn at its capacity, handed out cut."""

    def __init__(self, full, capacity):
        self.full, self.capacity, self._closed, self.lengths = full, capacity, False, []
        self.chains, self.tune = full.chains, 0

    def draws_up_to(self, length, announce=True):
        assert not self._closed and length <= self.capacity
        self.lengths.append(length)
        return self.full.idata.isel(draw=slice(0, length)), 1.0

    def close(self):
        self._closed = True


class ExtendableFake(FakeSampler):
    """A :class:`FakeSampler` whose runs can be continued (as nutpie's, given a capacity)."""

    def __init__(self, design, behave):
        super().__init__(design, behave)
        self.handles = []

    def __call__(self, design, priors, **kw):
        import dataclasses

        from harness.engines.pymc import draws_until_divergent

        capacity = kw.pop("capacity", None)
        check_every = kw.pop("check_every", None)
        if capacity is None:
            return super().__call__(design, priors, **kw)
        full = super().__call__(design, priors, **{**kw, "draws": capacity})
        handle = FakeChains(full, capacity)
        self.handles.append(handle)
        raw, _ = draws_until_divergent(handle, kw["draws"], check_every)
        return dataclasses.replace(full, idata=raw, chains_handle=handle, finish=lambda r: r)


def _loop_extendable(behave, **first):
    from harness.engines.adaptive import sample_adaptively

    design = _fake_design()
    fake = ExtendableFake(design, behave)
    args = {"seed": 5, "draws": 300, "tune": 300, "chains": 4, "target_accept": 0.9, **first}
    outcome = sample_adaptively(
        design, resolve_priors(design), sampler="nutpie", sample_once=fake, **args
    )
    return outcome, fake


def test_chains_short_of_ess_are_continued_not_restarted():
    # The fixed effect's ESS a little short (AR(1) 0.84: ~390 of 4000), R-hat holding:
    # the same four chains go on (no warm-up, no draw thrown away) for the ESS missing.
    outcome, fake = _loop_extendable(lambda kw: {"beta_rho": 0.84}, draws=1000, seed=3)
    rounds = outcome.record["rounds"]
    assert _actions(outcome) == ["first run", "extend chains"]
    assert len(fake.calls) == 1  # one sampler run, continued
    length = rounds[1]["draws"]
    factor = rounds[1]["evidence"]["extension_factor"]
    assert 1.0 < factor < 2.0 and abs(length - 1000 * factor) <= 1  # factor rounded to 3 places
    assert rounds[1]["iterations"] == 4 * (length - 1000)  # no warm-up again
    assert outcome.record["draws_sampled"] == 4 * length < 2 * 4 * 1000
    beta = outcome.idata.posterior["beta"].values
    assert beta.shape[:2] == (4, length)
    first = fake.handles[0].full.idata.posterior["beta"].values
    np.testing.assert_array_equal(beta, first[:, :length])  # the first run's chains, longer
    assert outcome.record["reliable"]
    assert all(handle._closed for handle in fake.handles)  # no sampler threads left behind


def test_slowly_mixing_chains_are_continued_while_rhat_falls():
    # R-hat over its target from chains that agree (AR(1) 0.85 on beta), short of it by less
    # than a doubling: the same chains are continued, which costs less than any new run.
    outcome, fake = _loop_extendable(lambda kw: {"beta_rho": 0.85}, draws=1000, seed=1)
    rounds = outcome.record["rounds"]
    assert rounds[0]["after"]["max_r_hat"] > 1.01 and rounds[0]["after"]["divergences"] == 0
    assert _actions(outcome) == ["first run", "extend chains"]
    z = rounds[1]["evidence"]["chain_disagreement"]["chain_z"]
    assert max(abs(v) for v in z) <= ODD_CHAIN_Z  # no stray chain: only short
    assert len(fake.calls) == 1
    assert 1000 < rounds[1]["draws"] < 2000
    assert rounds[1]["after"]["max_r_hat"] < rounds[0]["after"]["max_r_hat"]
    assert outcome.record["draws_sampled"] == 4 * rounds[1]["draws"]
    assert outcome.record["reliable"]


def test_chains_short_by_more_than_a_doubling_are_continued_then_judged_again():
    # AR(1) 0.9: ESS ~200 of 4000, more than a doubling short (so the rule's run came first
    # where it had one): the chains are doubled, judged again, and continued while R-hat falls.
    outcome, fake = _loop_extendable(lambda kw: {"beta_rho": 0.9}, draws=1000, seed=3)
    rounds = outcome.record["rounds"]
    assert rounds[1]["evidence"]["extension_factor"] > 2.0
    assert _actions(outcome) == ["first run", "extend chains", "extend chains"]
    assert rounds[1]["draws"] == 2000  # at most doubled per round
    assert len(fake.calls) == 1
    assert outcome.record["reliable"]


def test_a_new_geometry_about_as_efficient_does_not_replace_longer_chains():
    from harness.engines.adaptive import _dearer_to_continue

    def diag(ess, per_1k):
        return {"min_ess_bulk": ess, "min_ess_tail": ess, "ess_per_1k_gradients": per_1k}

    settings = AdaptiveSettings()
    # 198 effective draws at 7.1 per 1k gradients vs a short new run with 114 at 8.1:
    # the old chains reach 480 for fewer further gradients, so they are kept.
    assert _dearer_to_continue(diag(114, 8.1), diag(198, 7.1), settings)
    # A geometry three times as efficient is worth its shorter run.
    assert not _dearer_to_continue(diag(114, 21.3), diag(198, 7.1), settings)


def test_a_stray_chain_or_divergences_are_never_continued():
    # A chain settled elsewhere needs a new warm-up; divergent draws are biased: neither is
    # made longer, even where the chains could be continued.
    stray, _ = _loop_extendable(lambda kw: {"shift": {} if kw["tune"] >= 600 else {2: 0.6}})
    assert _actions(stray) == ["first run", "restart with longer warm-up"]
    diverging, fake = _loop_extendable(
        lambda kw: {"divergences": 3 if kw["target_accept"] < 0.95 else 0}
    )
    assert "extend chains" not in _actions(diverging)
    assert _actions(diverging)[-1] in ("raise target_accept", "re-parameterise")
    assert all(handle._closed for handle in fake.handles)


@pytest.mark.sampling
def test_continued_nutpie_chains_are_the_longer_run_draw_for_draw(funnel_fits):
    # The same seed: 150 draws continued to 300 are a 300-draw run's, and the first 150 a
    # 150-draw run's (each chain's draws depend on its seed alone, not on the pause).
    from harness.engines.pymc import sample_once

    data, _ = funnel_fits
    design = build_design(FUNNEL, data)
    priors = resolve_priors(design)
    args = {"seed": 4, "tune": 200, "chains": 2, "sampler": "nutpie", "target_accept": 0.9}
    args["centered"] = centered_blocks(design, "all")
    short = sample_once(design, priors, draws=150, capacity=400, **args)
    assert short.extendable and short.capacity == 400
    longer = short.extend(300)
    short.close()
    assert not longer.extendable
    once_150 = sample_once(design, priors, draws=150, **args)
    once_300 = sample_once(design, priors, draws=300, **args)
    for name in ("beta", "sd_school", "u_school"):
        np.testing.assert_array_equal(
            short.idata.posterior[name].values, once_150.idata.posterior[name].values
        )
        np.testing.assert_array_equal(
            longer.idata.posterior[name].values, once_300.idata.posterior[name].values
        )
    np.testing.assert_array_equal(
        longer.idata.sample_stats["diverging"].values,
        once_300.idata.sample_stats["diverging"].values,
    )


def test_a_diverging_run_stops_at_its_first_divergent_stretch():
    # Divergent draws (the first 3 of chain 0) until target_accept 0.95: the first run stops
    # after its first stretch of a quarter of its draws, and only what was sampled is counted.
    outcome, fake = _loop_extendable(
        lambda kw: {"divergences": 3 if kw["target_accept"] < 0.95 else 0}, draws=1000
    )
    rounds = outcome.record["rounds"]
    assert rounds[0]["draws"] == 250 and rounds[0]["after"]["draws"] == 250
    assert rounds[0]["after"]["divergences"] == 3
    assert rounds[0]["why"].startswith("stopped after 250 of 1000 draws per chain: 3 divergence")
    assert rounds[0]["iterations"] == 4 * (300 + 250)
    assert fake.handles[0].lengths == [250]  # never sampled past the divergent stretch
    # The next run is clean: sampled stretch by stretch to its full length.
    assert rounds[1]["target_accept"] == 0.95 and rounds[1]["draws"] == 500
    assert fake.handles[1].lengths == [125, 250, 375, 500]
    assert "stopped" not in rounds[1]["why"]
    # Continued chains count their new draws (their ``iterations``), new runs what they hold.
    sampled = sum(
        r["iterations"] if r["action"] == "extend chains" else r["chains"] * r["draws"]
        for r in rounds
    )
    assert outcome.record["draws_sampled"] == sampled < 2 * 4 * 1000
    assert outcome.record["reliable"]


def test_a_checked_run_is_one_progress_line_that_says_where_it_stopped(monkeypatch, capsys):
    from harness import progress
    from harness.engines.pymc import draws_until_divergent

    monkeypatch.delenv("HARNESS_QUIET", raising=False)
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    progress.set_design("demo")
    design = _fake_design()
    fake = FakeSampler(design, lambda kw: {"divergences": 0})
    full = fake(design, None, seed=1, chains=4, draws=400, target_accept=0.9, centered=())
    diverging = full.idata.sample_stats["diverging"].values.copy()
    diverging[2, 130] = True  # one divergence in the second stretch
    full.idata.sample_stats["diverging"].values[:] = diverging
    handle = FakeChains(full, 400)
    raw, _ = draws_until_divergent(handle, 400, 100)
    assert raw.posterior.sizes["draw"] == 200 and handle.lengths == [100, 200]
    err = [line for line in capsys.readouterr().err.splitlines() if "done in" in line]
    assert len(err) == 1
    assert err[0].startswith("demo: sampling 4 chains x 0+400 draws (checked for divergences")
    assert "stopped after 200 draws: a divergence" in err[0]


def test_a_loop_that_ends_on_a_stopped_run_completes_it():
    # Divergent whatever is tried: the loop ends without a remedy, and the run it keeps (one
    # that stopped at its first stretch) is continued to its planned length for the report.
    outcome, fake = _loop_extendable(lambda kw: {"divergences": 3}, draws=1000)
    rounds = outcome.record["rounds"]
    assert all("stopped after" in r["why"] for r in rounds[:-1])
    last = rounds[-1]
    assert last["action"] == "complete the kept run" and last["kept"]
    assert last["after"]["draws"] == last["draws"] > rounds[-2]["after"]["draws"]
    assert last["after"]["divergences"] >= 3 and not outcome.record["reliable"]
    assert outcome.record["reason"].endswith(f"completed to {last['draws']} draws per chain")
    assert outcome.idata.posterior.sizes["draw"] == last["draws"]
    assert all(handle._closed for handle in fake.handles)


def test_a_run_that_diverges_less_often_is_less_divergent_whatever_its_length():
    from harness.engines.adaptive import _dominated, _worse

    def diag(divergences, draws):
        return {
            "divergences": divergences,
            "chains": 4,
            "draws": draws,
            "max_r_hat": 1.0,
            "min_ess_bulk": 500.0,
            "min_ess_tail": 500.0,
            "ess_per_1k_gradients": 1.0,
        }

    # 3 divergences in a stopped run of 250 draws per chain are more often than 5 in 1000.
    assert _worse(diag(3, 250), diag(5, 1000)) and _dominated(diag(3, 250), diag(5, 1000))
    assert not _worse(diag(5, 1000), diag(3, 250))
    assert not _worse(diag(0, 250), diag(1, 1000))


def test_the_last_round_allowed_is_sampled_whole():
    # With one round only there is no remedy to stop for: the run keeps all its draws.
    from harness.engines.adaptive import sample_adaptively

    design = _fake_design()
    fake = ExtendableFake(design, lambda kw: {"divergences": 3})
    outcome = sample_adaptively(
        design,
        resolve_priors(design),
        sampler="nutpie",
        sample_once=fake,
        seed=5,
        draws=1000,
        tune=300,
        chains=4,
        target_accept=0.9,
        settings=AdaptiveSettings(max_rounds=1),
    )
    assert outcome.record["rounds"][0]["draws"] == 1000
    assert "check_every" not in fake.calls[0]


@pytest.mark.sampling
def test_a_checked_nutpie_run_is_a_prefix_of_the_whole_run():
    # The centred funnel diverges: checked every 50 draws, the run stops at the first stretch
    # with a divergence, and what it holds is the unchecked run's first draws, draw for draw.
    from harness.engines.pymc import sample_once

    design = build_design(FUNNEL, funnel_data())
    priors = resolve_priors(design)
    args = {"seed": 4, "tune": 200, "chains": 2, "sampler": "nutpie", "target_accept": 0.8}
    args["centered"] = centered_blocks(design, "all")
    whole = sample_once(design, priors, draws=400, **args)
    checked = sample_once(design, priors, draws=400, check_every=50, **args)
    checked.close()
    length = checked.idata.posterior.sizes["draw"]
    diverging = whole.idata.sample_stats["diverging"].values
    assert diverging.any()
    first = int(np.flatnonzero(diverging.any(axis=0))[0])  # the first divergent draw
    assert length == 50 * (first // 50 + 1) < 400
    for name in ("beta", "sd_school", "u_school"):
        np.testing.assert_array_equal(
            checked.idata.posterior[name].values, whole.idata.posterior[name].values[:, :length]
        )


def test_divergences_and_the_rules_other_form_share_one_round():
    # Both blocks centred where the data are weak (the rule says non-centred), and the run
    # diverges: one round switches the form and takes the next target_accept step.
    outcome, _ = _loop(
        lambda kw: {"divergences": 3 if kw["target_accept"] < 0.95 else 0}, centered={"g", "h"}
    )
    rounds = outcome.record["rounds"]
    assert rounds[0]["after"]["divergences"] == 3
    assert rounds[1]["action"] == "re-parameterise"
    assert rounds[1]["parameterization"] == {"g": "non-centred", "h": "non-centred"}
    assert rounds[1]["target_accept"] == 0.95
    assert "also target_accept 0.9 -> 0.95" in rounds[1]["why"]
    assert len(rounds) == 2 and outcome.record["reliable"]


def test_chains_that_would_need_four_times_their_length_try_the_low_rank_run_first():
    # AR(1) 0.97 on beta: ESS far short (continuing would cost three runs' worth of draws or
    # more), so the short low-rank run is tried before the chains are continued.
    from harness.engines.adaptive import LOW_RANK_FIRST

    outcome, _ = _loop_extendable(lambda kw: {"beta_rho": 0.97}, draws=1000, seed=1)
    rounds = outcome.record["rounds"]
    assert rounds[0]["after"]["max_r_hat"] > 1.01 and rounds[0]["after"]["divergences"] == 0
    assert rounds[1]["action"] == "low-rank mass matrix"
    assert rounds[1]["evidence"]["extension_factor"] >= LOW_RANK_FIRST
    assert rounds[1]["draws"] == 500  # a new run: half the first run's draws
