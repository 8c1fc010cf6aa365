"""Auditing a user's own PyMC model: correct models pass, planted mistakes fail by name.

No sampling here (the likelihood, random-effects and priors checks read prior
draws); the posterior check against lme4 is in the slow test at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.audit import AuditError, audit, load_model_file
from harness.datasets.partially_clustered import simulate_partially_clustered

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "audit"
TRIAL = "y ~ 1 + tx + (0 + tx | group)"


@pytest.fixture(scope="module")
def trial() -> pd.DataFrame:
    return simulate_partially_clustered(seed=3)


def _run(user, data, formula, **kw):
    return audit(user.build, data, formula, user.mapping, posterior=False, **kw)


# ----------------------------------------------------------------------------- correct models


def test_matrix_form_trial_passes(trial):
    result = _run(
        load_model_file(EXAMPLES / "partially_clustered_matrix.py"), trial, TRIAL, sigma_by="arm"
    )
    assert result.checks["likelihood"].verdict == "pass", result.checks["likelihood"].diagnosis
    assert result.checks["random_effects"].verdict == "pass", result.checks[
        "random_effects"
    ].diagnosis
    assert result.checks["priors"].verdict == "pass"
    # No sampling asked for: the audit is incomplete, never "pass".
    assert result.checks["posterior"].verdict == "incomplete"
    assert result.verdict == "incomplete"


def test_sleepstudy_lkj_passes(sleepstudy):
    data, spec = sleepstudy
    result = _run(load_model_file(EXAMPLES / "sleepstudy_lkj.py"), data, spec.formula)
    assert result.checks["likelihood"].verdict == "pass", result.checks["likelihood"].diagnosis
    assert result.checks["random_effects"].verdict == "pass", result.checks[
        "random_effects"
    ].diagnosis
    priors = result.checks["priors"]
    assert priors.verdict == "pass"  # differences are reported, not failed
    assert priors.tables["priors"]["differs"].any()
    assert "differ" in priors.diagnosis


def test_harness_loglik_is_the_harness_models(trial):
    """The NumPy likelihood the audit uses equals the harness's own PyMC model's, pointwise."""
    import pymc as pm

    from harness.audit.draws import harness_loglik
    from harness.engines.pymc import build_model

    design = hz.build_design(hz.ModelSpec(TRIAL, sigma_by="arm"), trial)
    model = build_model(design)
    with model:
        prior = pm.sample_prior_predictive(draws=20, random_seed=2)
    import arviz as az

    logs = pm.compute_log_likelihood(
        az.InferenceData(posterior=prior.prior[[v.name for v in model.free_RVs]]),
        model=model,
        extend_inferencedata=False,
        progressbar=False,
    )
    theirs = logs["y_obs"].values.reshape(20, -1)
    ours = harness_loglik(design, prior.prior)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


# ----------------------------------------------------------------------------- planted mistakes


def _trial_model(mistake: str = ""):
    import pymc as pm

    def build(data: pd.DataFrame):
        X = np.column_stack([np.ones(len(data)), data["tx"].to_numpy(float)])
        groups = list(pd.Categorical(data["group"]).categories.astype(str))
        index = pd.Categorical(data["group"].astype(str), categories=groups).codes
        tx = data["tx"].to_numpy(float)
        arm = pd.Categorical(data["arm"], categories=["control", "treatment"]).codes
        with pm.Model(coords={"g": groups}) as model:
            B = pm.Normal("B", 0.0, 10.0, shape=2)
            sd_u = pm.HalfNormal("sd_u", 2.0)
            U = pm.Normal("U", 0.0, sd_u, dims="g")
            sigma = pm.HalfNormal("sigma", 2.0, shape=2)
            # The mistake: every row gets its group's effect, control rows included.
            effect = U[index] if mistake == "control_cluster" else U[index] * tx
            scale = sigma[arm] ** 2 if mistake == "sigma_variance" else sigma[arm]
            if mistake == "one_sigma":
                scale = sigma[0]
            pm.Normal("y", pt_dot(X, B) + effect, scale, observed=data["y"].to_numpy())
        return model

    mapping = {
        "(Intercept)": "B[0]",
        "tx": "B[1]",
        "group: sd(tx)": "sd_u",
        "sigma: arm=control": "sigma[0]",
        "sigma: arm=treatment": "sigma[1]",
        "group: tx": "U",
    }
    return build, mapping


def pt_dot(a, b):
    import pymc as pm

    return pm.math.dot(a, b)


def test_cluster_effect_given_to_control_rows_fails_likelihood(trial):
    build, mapping = _trial_model("control_cluster")
    result = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False)
    check = result.checks["likelihood"]
    assert check.verdict == "fail"
    assert "rows with tx=0" in check.diagnosis
    assert "the group effect on tx is not multiplied by tx" in check.diagnosis
    assert "effect the formula does not give them" in check.diagnosis
    assert result.verdict == "fail"


def test_variance_as_residual_sd_is_named(trial):
    build, mapping = _trial_model("sigma_variance")
    check = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False).checks[
        "likelihood"
    ]
    assert check.verdict == "fail"
    assert "a variance used as an SD" in check.diagnosis


def test_the_same_trial_model_without_the_mistake_passes(trial):
    build, mapping = _trial_model()
    result = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False)
    assert result.checks["likelihood"].verdict == "pass"
    assert result.checks["random_effects"].verdict == "pass"


def test_variance_used_as_sd_fails_random_effects(trial):
    result = _run(
        load_model_file(EXAMPLES / "partially_clustered_mistake.py"), trial, TRIAL, sigma_by="arm"
    )
    check = result.checks["random_effects"]
    assert check.verdict == "fail"
    assert "a variance used as an SD" in check.diagnosis
    # The likelihood itself is right: the mistake is in the offsets' law.
    assert result.checks["likelihood"].verdict == "pass"


def _sleep_model(mistake: str):
    import pymc as pm
    import pytensor.tensor as pt

    def build(data: pd.DataFrame):
        subjects = pd.Categorical(data["Subject"].astype(str))
        X = np.column_stack([np.ones(len(data)), data["Days"].to_numpy(float)])
        with pm.Model(coords={"subj": list(subjects.categories), "cols": ["a", "b"]}) as model:
            mu = pm.Normal("mu", 250.0, 100.0, shape=2)
            chol, _corr, stds = pm.LKJCholeskyCov(
                "L", n=2, eta=1.0, sd_dist=pm.HalfNormal.dist(30.0, size=2)
            )
            z = pm.Normal("z", 0.0, 1.0, dims=("subj", "cols"))
            if mistake == "dropped_correlation":
                u = pm.Deterministic("u", z * stds, dims=("subj", "cols"))
            elif mistake == "transposed":
                u = pm.Deterministic("u", z @ chol, dims=("subj", "cols"))
            elif mistake == "no_intercept":
                u = pm.Deterministic(
                    "u", pt.stack([0.0 * z[:, 0], z[:, 1] * stds[1]], axis=1), dims=("subj", "cols")
                )
            else:
                u = pm.Deterministic("u", z @ chol.T, dims=("subj", "cols"))
            sigma = pm.HalfNormal("sigma", 50.0)
            eta = (X * (mu + u[subjects.codes])).sum(axis=1)
            pm.Normal("y", eta, sigma, observed=data["Reaction"].to_numpy())
        return model

    mapping = {
        "(Intercept)": "mu[0]",
        "Days": "mu[1]",
        "Subject: sd((Intercept))": "L_stds[0]",
        "Subject: sd(Days)": "L_stds[1]",
        "Subject: cor((Intercept),Days)": "L_corr[0, 1]",
        "sigma": "sigma",
        "Subject: (Intercept)": lambda p: p["u"].sel(cols="a"),
        "Subject: Days": lambda p: p["u"].sel(cols="b"),
    }
    return build, mapping


@pytest.mark.parametrize(
    ("mistake", "named"),
    [
        ("dropped_correlation", "a dropped correlation"),
        ("transposed", "a transposed Cholesky factor"),
        ("no_intercept", "a missing random intercept"),
        ("", None),
    ],
)
def test_random_effects_law_mistakes_are_named(sleepstudy, mistake, named):
    data, spec = sleepstudy
    build, mapping = _sleep_model(mistake)
    result = audit(build, data, spec.formula, mapping, posterior=False)
    check = result.checks["random_effects"]
    assert result.checks["likelihood"].verdict == "pass", result.checks["likelihood"].diagnosis
    if named is None:
        assert check.verdict == "pass", check.diagnosis
    else:
        assert check.verdict == "fail"
        assert named in check.diagnosis


# ----------------------------------------------------------------------------- the mapping


def test_mapping_errors_name_the_key(trial):
    build, mapping = _trial_model()
    with pytest.raises(
        AuditError, match=r"'group: sd\(x\)' is not a harness row.*'group: sd\(tx\)'"
    ):
        audit(
            build,
            trial,
            TRIAL,
            {**mapping, "group: sd(x)": "sd_u"},
            sigma_by="arm",
            posterior=False,
        )
    with pytest.raises(AuditError, match=r"MAPPING\['tx'\] = 'b1': 'b1' is not a variable"):
        audit(build, trial, TRIAL, {**mapping, "tx": "b1"}, sigma_by="arm", posterior=False)
    with pytest.raises(AuditError, match=r"MAPPING\['tx'\] = 'B' has dims"):
        audit(build, trial, TRIAL, {**mapping, "tx": "B"}, sigma_by="arm", posterior=False)
    with pytest.raises(AuditError, match=r"MAPPING\['group: tx'\].*callable must return"):
        audit(
            build,
            trial,
            TRIAL,
            {**mapping, "group: tx": lambda p: 1.0},
            sigma_by="arm",
            posterior=False,
        )
    with pytest.raises(AuditError, match=r"no entry for 'sigma: arm=control'"):
        audit(
            build,
            trial,
            TRIAL,
            {k: v for k, v in mapping.items() if "control" not in k},
            sigma_by="arm",
            posterior=False,
        )


def test_offsets_without_group_labels_are_refused(trial):
    build, mapping = _trial_model()
    unlabeled = {**mapping, "group: tx": lambda p: p["U"].rename(g="g2").drop_vars("g2")}
    with pytest.raises(AuditError, match=r"MAPPING\['group: tx'\].*are not levels of 'group'"):
        audit(build, trial, TRIAL, unlabeled, sigma_by="arm", posterior=False)


def test_model_file_must_define_build_and_mapping(tmp_path):
    path = tmp_path / "MODEL.py"
    path.write_text("def build(data):\n    return None\n")
    with pytest.raises(AuditError, match="must define MAPPING"):
        load_model_file(path)
    with pytest.raises(AuditError, match="not found"):
        load_model_file(tmp_path / "missing.py")


# ----------------------------------------------------------------------------- with sampling


@pytest.mark.slow
@pytest.mark.r
def test_posterior_check_against_lme4(sleepstudy):
    data, spec = sleepstudy
    user = load_model_file(EXAMPLES / "sleepstudy_lkj.py")
    result = audit(user.build, data, spec.formula, user.mapping, draws=300, tune=300, chains=2)
    assert result.checks["posterior"].verdict in {"pass", "look", "unreliable"}
    assert result.checks["likelihood"].verdict == "pass"
    assert "posterior" in set(result.checks["likelihood"].tables["points"]["source"])


def test_cafe_m14_1_baked_in_passes_with_its_own_priors():
    data, spec = hz.datasets.load("cafe")
    user = load_model_file(EXAMPLES / "cafe_m14_1.py")
    result = audit(user.build, data, spec.formula, user.mapping, priors="m14.1", posterior=False)
    assert result.checks["likelihood"].verdict == "pass", result.checks["likelihood"].diagnosis
    assert result.checks["random_effects"].verdict == "pass", result.checks[
        "random_effects"
    ].diagnosis
    priors = result.checks["priors"]
    assert not priors.tables["priors"]["differs"].any(), priors.tables["priors"]
    assert priors.tables["priors"].set_index("row").loc["(Intercept)", "user_prior"].startswith("N")


def test_audit_command_writes_page_and_json(trial, tmp_path):
    from harness.cli import main

    csv = tmp_path / "trial.csv"
    trial.to_csv(csv, index=False)
    out, js = tmp_path / "audit.html", tmp_path / "audit.json"
    code = main(
        [
            "-q",
            "audit",
            str(EXAMPLES / "partially_clustered_mistake.py"),
            "--data",
            str(csv),
            "--formula",
            TRIAL,
            "--sigma-by",
            "arm",
            "--no-posterior",
            "--out",
            str(out),
            "--json",
            str(js),
        ]
    )
    assert code == 2  # not "pass"
    html = out.read_text(encoding="utf-8")
    assert "a variance used as an SD" in html
    assert 'id="likelihood"' in html and 'id="random_effects"' in html
    import json

    record = json.loads(js.read_text(encoding="utf-8"))
    assert record["verdict"] == "fail"
    assert record["checks"]["random_effects"]["verdict"] == "fail"


def test_audit_help_says_it_runs_the_model_file(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "RUNS THE CODE IN MODEL.py" in capsys.readouterr().out


def _cafe_model(mistake: str):
    import pymc as pm

    def build(data: pd.DataFrame):
        codes = pd.Categorical(data["cafe"]).codes  # the data's own level order (1, 2, ..., 20)
        labels = list(pd.Categorical(data["cafe"]).categories.astype(str))
        if mistake == "level_order":
            labels = sorted(labels)  # the mistake: coords in string order ("1", "10", "11", ...)
        rows = data.sort_values("afternoon") if mistake == "row_order" else data
        afternoon = rows["afternoon"].to_numpy(float)
        index = pd.Categorical(rows["cafe"]).codes if mistake == "row_order" else codes
        with pm.Model(coords={"cafe": labels}) as model:
            a = pm.Normal("a", 3.0, 2.0)
            b = pm.Normal("b", -1.0, 1.0)
            sd = pm.Exponential("sd", 1.0, shape=2)
            u_a = pm.Normal("u_a", 0.0, sd[0], dims="cafe")
            u_b = pm.Normal("u_b", 0.0, sd[1], dims="cafe")
            mu = a + u_a[index] + (b + u_b[index]) * afternoon
            pm.Normal("wait", mu, pm.Exponential("s", 1.0), observed=data["wait"].to_numpy())
        return model

    mapping = {
        "(Intercept)": "a",
        "afternoon": "b",
        "cafe: sd((Intercept))": "sd[0]",
        "cafe.1: sd(afternoon)": "sd[1]",
        "sigma": "s",
        "cafe: (Intercept)": "u_a",
        "cafe.1: afternoon": "u_b",
    }
    return build, mapping


@pytest.mark.parametrize(
    ("mistake", "named"),
    [
        ("level_order", "group indices in another order than the coordinates"),
        ("row_order", "the response in another row order than the predictors"),
        ("", None),
    ],
)
def test_index_and_row_order_mistakes_fail_the_likelihood(mistake, named):
    data, _ = hz.datasets.load("cafe")
    build, mapping = _cafe_model(mistake)
    formula = "wait ~ 1 + afternoon + (1 + afternoon || cafe)"
    result = audit(build, data, formula, mapping, posterior=False)
    check = result.checks["likelihood"]
    if named is None:
        assert check.verdict == "pass", check.diagnosis
        assert result.checks["random_effects"].verdict == "pass"
    else:
        assert check.verdict == "fail"
        assert named in check.diagnosis


def test_one_residual_sd_where_the_formula_has_one_per_arm_fails(trial):
    build, mapping = _trial_model("one_sigma")
    tied = {**mapping, "sigma: arm=control": "sigma[0]", "sigma: arm=treatment": "sigma[0]"}
    result = audit(build, trial, TRIAL, tied, sigma_by="arm", posterior=False)
    check = result.checks["likelihood"]
    assert check.verdict == "fail"
    assert "ties 'sigma: arm=control' and 'sigma: arm=treatment'" in check.diagnosis


def _cbpp_model(link: str):
    import pymc as pm

    def build(data: pd.DataFrame):
        herds = pd.Categorical(data["herd"].astype(str))
        period = pd.get_dummies(data["period"].astype(str), drop_first=True).to_numpy(float)
        with pm.Model(coords={"herd": list(herds.categories)}) as model:
            b0 = pm.Normal("b0", 0.0, 2.0)
            b = pm.Normal("b", 0.0, 2.0, shape=period.shape[1])
            sd = pm.HalfNormal("sd", 1.0)
            u = pm.Normal("u", 0.0, sd, dims="herd")
            eta = b0 + pm.math.dot(period, b) + u[herds.codes]
            n = data["size"].to_numpy().astype(int)
            y = data["incidence"].to_numpy().astype(int)
            if link == "logit":
                pm.Binomial("y", n=n, logit_p=eta, observed=y)
            else:
                pm.Binomial("y", n=n, p=pm.math.invprobit(eta), observed=y)
        return model

    mapping = {
        "(Intercept)": "b0",
        "period2": "b[0]",
        "period3": "b[1]",
        "period4": "b[2]",
        "herd: sd((Intercept))": "sd",
        "herd: (Intercept)": "u",
    }
    return build, mapping


@pytest.mark.parametrize("link", ["logit", "probit"])
def test_glmm_link_is_checked(link):
    data, spec = hz.datasets.load("cbpp")
    build, mapping = _cbpp_model(link)
    result = audit(build, data, spec.formula, mapping, family="binomial", posterior=False)
    check = result.checks["likelihood"]
    if link == "logit":
        assert check.verdict == "pass", check.diagnosis
        assert result.checks["random_effects"].verdict == "pass"
    else:
        assert check.verdict == "fail"
        assert "the probit link where the formula's family has the logit link" in check.diagnosis


def test_two_observed_variables_compare_totals(trial):
    import pymc as pm

    def build(data):
        X = np.column_stack([np.ones(len(data)), data["tx"].to_numpy(float)])
        groups = list(pd.Categorical(data["group"]).categories.astype(str))
        index = pd.Categorical(data["group"].astype(str), categories=groups).codes
        tx = data["tx"].to_numpy(float)
        control = data["tx"].to_numpy() == 0
        with pm.Model(coords={"g": groups}) as model:
            B = pm.Normal("B", 0.0, 10.0, shape=2)
            sd_u = pm.HalfNormal("sd_u", 2.0)
            U = pm.Normal("U", 0.0, sd_u, dims="g")
            sigma = pm.HalfNormal("sigma", 2.0, shape=2)
            mu = pm.math.dot(X, B) + U[index] * tx
            y = data["y"].to_numpy()
            # One likelihood per arm, each with its own residual SD (seed 000's question 3).
            pm.Normal("y_control", mu[control], sigma[0], observed=y[control])
            pm.Normal("y_treated", mu[~control], sigma[1], observed=y[~control])
        return model

    _, mapping = _trial_model()
    result = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False)
    check = result.checks["likelihood"]
    assert check.verdict == "pass", check.diagnosis
    assert "totals agree" in check.diagnosis


def test_improper_priors_leave_the_prior_checks_incomplete(trial):
    import pymc as pm

    base, mapping = _trial_model()

    def build(data):
        model = base(data)
        with model:
            pm.Flat("unused")
        return model

    result = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False)
    assert result.checks["random_effects"].verdict == "incomplete"
    assert result.checks["likelihood"].verdict == "incomplete"
    assert result.verdict == "incomplete"


# ----------------------------------------------------------------------------- prior share, efficiency
# No sampling: prior draws stand in for posteriors (both are draws of a known law), so
# importance re-weighting and the row-by-row comparison have a known right answer.


def _prior_fit(design, idata_posterior, hdraws, engine_seed=1):
    import arviz as az
    import xarray as xr

    from harness.audit.fit_adapter import as_bayes_fit
    from harness.model.priors import resolve_priors

    diverging = xr.zeros_like(hdraws["beta"].isel(fixed_term=0), dtype=bool).rename("diverging")
    idata = az.InferenceData(posterior=idata_posterior, sample_stats=diverging.to_dataset())
    return as_bayes_fit(
        design,
        resolve_priors(design),
        idata,
        hdraws,
        seed=engine_seed,
        draws=hdraws.sizes["draw"],
        tune=0,
        chains=hdraws.sizes["chain"],
        compile_seconds=0.0,
        sample_seconds=1.0,
        source="",
    )


def _four_chains(ds):
    """One chain of independent draws as four chains (R-hat and ESS need chains)."""
    import xarray as xr

    n = ds.sizes["draw"] // 4
    parts = [ds.isel(chain=0, draw=slice(i * n, (i + 1) * n)) for i in range(4)]
    parts = [p.drop_vars(["chain", "draw"]).assign_coords(draw=np.arange(n)) for p in parts]
    out = xr.concat(parts, dim="chain").assign_coords(chain=np.arange(4))
    return out.transpose("chain", "draw", ...)


def _wide_trial_model(user, data):
    """The trial's matrix-form model with priors heavier-tailed than the harness's.

    Importance re-weighting from a prior to another works only from the heavier
    tails to the lighter (otherwise the weights are unbounded, k-hat > 0.7).
    """
    import pymc as pm

    X, Z, clusters = user.build.__globals__["design_matrices"](data)
    arm = pd.Categorical(data["arm"], categories=["control", "treatment"]).codes
    with pm.Model(coords={"cluster": clusters, "arm": ["control", "treatment"]}) as model:
        B = pm.StudentT("B", nu=3, mu=0.0, sigma=8.0, shape=2)
        sigma_u = pm.HalfStudentT("sigma_u", nu=3, sigma=6.0)
        U = pm.Normal("U", mu=0.0, sigma=sigma_u, dims="cluster")
        sigma_e = pm.HalfStudentT("sigma_e", nu=3, sigma=2.0, dims="arm")
        mu = pm.math.dot(X, B) + pm.math.dot(Z, U)
        pm.Normal("y", mu=mu, sigma=sigma_e[arm], observed=data["y"].to_numpy())
    return model


@pytest.fixture(scope="module")
def trial_priors(trial):
    from harness.audit.draws import user_prior_draws
    from harness.audit.mapping import harness_draws
    from harness.audit.run import _harness_prior_draws
    from harness.model.priors import resolve_priors
    from harness.model.spec import ModelSpec, build_design

    user = load_model_file(EXAMPLES / "partially_clustered_matrix.py")
    design = build_design(ModelSpec(TRIAL, sigma_by="arm"), trial)
    model = _wide_trial_model(user, design.data.reset_index(drop=True))
    prior = _four_chains(user_prior_draws(model, 4000, 5))
    hprior = harness_draws(user.mapping, prior, design)
    theirs = _four_chains(_harness_prior_draws(design, resolve_priors(design), 4000, 6))
    return user, design, model, prior, hprior, theirs


def test_prior_share_reweights_the_users_prior_to_the_harnesss(trial_priors):
    from harness.audit.prior_share import prior_share
    from harness.model.priors import resolve_priors

    user, design, model, prior, hprior, theirs = trial_priors
    share = prior_share(model, user.mapping, design, resolve_priors(design), prior, hprior)
    assert share.weights is not None and share.reliable, (share.k_hat, share.why)
    # Re-weighted, the user's prior draws of sd(tx) follow the harness's prior.
    x = hprior["sd_group"].values.reshape(-1)
    target = float(theirs["sd_group"].mean())
    reweighted = float(np.sum(share.weights * x))
    assert abs(reweighted - target) < 0.1 * target, (reweighted, target, float(x.mean()))
    assert abs(float(x.mean()) - target) > 0.2 * target  # the priors really differ


def test_prior_share_not_available_through_a_callable(trial_priors):
    from harness.audit.prior_share import prior_share
    from harness.model.priors import resolve_priors

    user, design, model, prior, hprior, _ = trial_priors
    mapping = dict(user.mapping) | {"tx": lambda post: post["B"].isel(B_dim_0=1)}
    share = prior_share(model, mapping, design, resolve_priors(design), prior, hprior)
    assert share.weights is None and not share.reliable
    assert "tx (mapped through a callable)" in share.why


def test_against_harness_passes_prior_gaps_and_fails_a_shift(trial_priors):
    """Two different priors pass once the share is removed; a shifted posterior fails."""
    from harness.audit.against_harness import harness_check
    from harness.audit.prior_share import prior_share
    from harness.model.priors import resolve_priors

    user, design, model, prior, hprior, theirs = trial_priors
    resolved = resolve_priors(design)
    share = prior_share(model, user.mapping, design, resolved, prior, hprior)
    mine = _prior_fit(design, prior, hprior)
    harness_fit = _prior_fit(design, theirs, theirs)
    check, pair = harness_check(mine, harness_fit, share, priors_differ=True)
    rows = check.tables["rows"].set_index("row")
    assert pair.table.set_index("row").loc["group: sd(tx)", "verdict"] == "fail"  # raw gap
    assert rows.loc["group: sd(tx)", "verdict"] == "pass", rows.loc["group: sd(tx)", "note"]
    assert "prior share" in rows.loc["group: sd(tx)", "note"]
    # Negative control: the user's draws of sd(tx) moved by 50%: the prior share cannot explain it.
    shifted = hprior.copy()
    shifted["sd_group"] = hprior["sd_group"] * 1.5
    check, _ = harness_check(_prior_fit(design, prior, shifted), harness_fit, share, True)
    rows = check.tables["rows"].set_index("row")
    assert rows.loc["group: sd(tx)", "verdict"] == "fail"
    assert check.verdict == "fail"
    # Without a share and with differing priors, a raw gap is "look", never "fail".
    from harness.audit.prior_share import PriorShare

    check, _ = harness_check(mine, harness_fit, PriorShare(None, why="test"), True)
    assert check.tables["rows"].set_index("row").loc["group: sd(tx)", "verdict"] == "look"
    assert "prior share not computed" in check.diagnosis


def test_efficiency_names_centred_offsets_and_matrix_products(trial, sleepstudy):
    from harness.audit.efficiency import offsets_form, uses_matrix_product
    from harness.model.spec import ModelSpec, build_design

    user = load_model_file(EXAMPLES / "partially_clustered_matrix.py")
    design = build_design(ModelSpec(TRIAL, sigma_by="arm"), trial)
    model = user.build(design.data.reset_index(drop=True))
    assert offsets_form(model, "U", design.blocks[0]) == "centred"
    assert uses_matrix_product(model, design, ["U"])

    import pymc as pm

    with pm.Model() as nc:
        z = pm.Normal("z", 0.0, 1.0, shape=len(design.blocks[0].levels))
        s = pm.HalfNormal("s", 1.0)
        pm.Deterministic("u", z * s)
    assert offsets_form(nc, "u", design.blocks[0]) == "non-centred"

    data, spec = sleepstudy
    sleep = load_model_file(EXAMPLES / "sleepstudy_lkj.py")
    sdesign = build_design(spec, data)
    smodel = sleep.build(sdesign.data.reset_index(drop=True))
    block = sdesign.blocks[0]
    assert (
        offsets_form(smodel, sleep.mapping[f"{block.label}: {block.terms[0]}"], block) == "centred"
    )
    assert not uses_matrix_product(smodel, sdesign, [])


@pytest.mark.slow
@pytest.mark.r
def test_posterior_against_the_harness_and_efficiency(trial, tmp_path):
    """Sampling end to end: checks d (second half) and e appear on the page and in the JSON."""
    import json

    from harness.report.audit_page import write_audit

    user = load_model_file(EXAMPLES / "partially_clustered_matrix.py")
    result = audit(
        user.build, trial, TRIAL, user.mapping, sigma_by="arm", draws=300, tune=300, chains=2
    )
    against = result.checks["posterior_harness"]
    assert against.verdict in {"pass", "unreliable"}, against.diagnosis
    assert "k-hat" in against.diagnosis
    efficiency = result.checks["efficiency"]
    assert efficiency.verdict in {"pass", "look"}, efficiency.diagnosis
    assert "centred" in efficiency.diagnosis and "Z @ u" in efficiency.diagnosis
    record = json.loads(result.to_json())
    assert set(record["checks"]) >= {"posterior_harness", "efficiency"}
    html = write_audit(result, tmp_path / "audit.html").read_text(encoding="utf-8")
    assert 'id="posterior_harness"' in html and 'id="efficiency"' in html


# ----------------------------------------------------------------------------- the rest of the catalogue


def _cbpp_coded(mistake: str):
    """cbpp in the user's style: dummy columns built by hand, with one planted coding mistake."""
    import pymc as pm

    def build(data: pd.DataFrame):
        herds = pd.Categorical(data["herd"].astype(str))
        period = data["period"].astype(str)
        levels = ["1", "2", "3", "4"]
        onehot = np.column_stack([(period == lev).to_numpy(float) for lev in levels])
        if mistake == "reference_last":
            P = onehot[:, :3]  # get_dummies(...).iloc[:, :-1]: period 4 as the reference
        elif mistake == "sum":
            P = onehot[:, :3] - onehot[:, [3]]
        else:
            P = onehot[:, 1:]
        with pm.Model(coords={"herd": list(herds.categories)}) as model:
            b0 = pm.Normal("b0", 0.0, 2.0)
            b = pm.Normal("b", 0.0, 2.0, shape=P.shape[1])
            sd = pm.HalfNormal("sd", 1.0)
            u = pm.Normal("u", 0.0, sd, dims="herd")
            if mistake == "dropped":  # period4's column forgotten in the linear predictor
                eta = b0 + pm.math.dot(P[:, :2], b[:2]) + u[herds.codes]
            else:
                eta = b0 + pm.math.dot(P, b) + u[herds.codes]
            y = data["incidence"].to_numpy().astype(int)
            if mistake in ("poisson", "no_offset"):
                offset = 0.0 if mistake == "no_offset" else np.log(data["size"].to_numpy(float))
                pm.Poisson("y", mu=pm.math.exp(eta + offset), observed=y)
            else:
                n = data["size"].to_numpy().astype(int)
                pm.Binomial("y", n=n, logit_p=eta, observed=y)
        return model

    mapping = {
        "(Intercept)": "b0",
        "period2": "b[0]",
        "period3": "b[1]",
        "period4": "b[2]",
        "herd: sd((Intercept))": "sd",
        "herd: (Intercept)": "u",
    }
    return build, mapping


@pytest.mark.parametrize(
    ("mistake", "named"),
    [
        ("reference_last", "coded with treatment contrasts with reference level '4'"),
        ("sum", "coded with sum-to-zero contrasts"),
        ("dropped", "the fixed effect 'period4' is missing"),
        ("", None),
    ],
)
def test_fixed_effect_coding_mistakes_are_named(mistake, named):
    data, spec = hz.datasets.load("cbpp")
    build, mapping = _cbpp_coded(mistake)
    result = audit(build, data, spec.formula, mapping, family="binomial", posterior=False)
    check = result.checks["likelihood"]
    if named is None:
        assert check.verdict == "pass", check.diagnosis
    else:
        assert check.verdict == "fail"
        assert named in check.diagnosis, check.diagnosis


@pytest.mark.parametrize(("mistake", "verdict"), [("poisson", "pass"), ("no_offset", "fail")])
def test_glmm_missing_offset_is_named(mistake, verdict):
    data, _ = hz.datasets.load("cbpp")
    build, mapping = _cbpp_coded(mistake)
    formula = "incidence ~ period + offset(log(size)) + (1 | herd)"
    result = audit(build, data, formula, mapping, family="poisson", posterior=False)
    check = result.checks["likelihood"]
    assert check.verdict == verdict, check.diagnosis
    if verdict == "fail":
        assert "the formula's offset() term is missing" in check.diagnosis


def _trial_law(mistake: str):
    import pymc as pm

    _, mapping = _trial_model()

    def build(data: pd.DataFrame):
        X = np.column_stack([np.ones(len(data)), data["tx"].to_numpy(float)])
        groups = list(pd.Categorical(data["group"]).categories.astype(str))
        index = pd.Categorical(data["group"].astype(str), categories=groups).codes
        tx = data["tx"].to_numpy(float)
        arm = pd.Categorical(data["arm"], categories=["control", "treatment"]).codes
        with pm.Model(coords={"g": groups}) as model:
            B = pm.Normal("B", 0.0, 10.0, shape=2)
            sd_u = pm.HalfNormal("sd_u", 2.0)
            # PyMC 2 / BUGS: dnorm(0, tau) takes a precision; PyMC 5's second argument is an SD.
            U = pm.Normal("U", 0.0, 1.0 / sd_u**2 if mistake == "precision" else sd_u, dims="g")
            sigma = pm.HalfNormal("sigma", 2.0, shape=2)
            pm.Normal("y", pm.math.dot(X, B) + U[index] * tx, sigma[arm], observed=data["y"])
        return model

    return build, mapping


def test_precision_used_as_sd_fails_random_effects(trial):
    build, mapping = _trial_law("precision")
    result = audit(build, trial, TRIAL, mapping, sigma_by="arm", posterior=False)
    check = result.checks["random_effects"]
    assert check.verdict == "fail"
    assert "a precision used as an SD" in check.diagnosis, check.diagnosis
    assert result.checks["likelihood"].verdict == "pass"


def test_correlation_matrix_used_as_covariance_fails_random_effects(sleepstudy):
    import pymc as pm
    import pytensor.tensor as pt

    data, spec = sleepstudy
    _, mapping = _sleep_model("")

    def build(frame: pd.DataFrame):
        subjects = pd.Categorical(frame["Subject"].astype(str))
        X = np.column_stack([np.ones(len(frame)), frame["Days"].to_numpy(float)])
        with pm.Model(coords={"subj": list(subjects.categories), "cols": ["a", "b"]}) as model:
            mu = pm.Normal("mu", 250.0, 100.0, shape=2)
            _chol, corr, _stds = pm.LKJCholeskyCov(
                "L", n=2, eta=1.0, sd_dist=pm.HalfNormal.dist(30.0, size=2)
            )
            # The mistake: MvNormal(cov=corr), the correlation matrix as the covariance.
            z = pm.Normal("z", 0.0, 1.0, dims=("subj", "cols"))
            u = pm.Deterministic("u", z @ pt.linalg.cholesky(corr).T, dims=("subj", "cols"))
            sigma = pm.HalfNormal("sigma", 50.0)
            eta = (X * (mu + u[subjects.codes])).sum(axis=1)
            pm.Normal("y", eta, sigma, observed=frame["Reaction"].to_numpy())
        return model

    result = audit(build, data, spec.formula, mapping, posterior=False)
    check = result.checks["random_effects"]
    assert check.verdict == "fail", (check.diagnosis, check.tables)
    assert "a correlation matrix used as the covariance" in check.diagnosis, check.diagnosis


# ----------------------------------------------------------------------------- a newcomer's style


def test_mvnormal_offsets_model_passes_and_its_cov_mistake_fails(sleepstudy):
    """``u ~ MvNormal(0, chol=chol)`` passes; ``cov=chol`` (a Cholesky factor as the covariance) fails."""
    data, spec = sleepstudy
    right = _run(load_model_file(EXAMPLES / "sleepstudy_mvnormal.py"), data, spec.formula)
    assert right.checks["likelihood"].verdict == "pass", right.checks["likelihood"].diagnosis
    assert right.checks["random_effects"].verdict == "pass"
    wrong = _run(load_model_file(EXAMPLES / "sleepstudy_mvnormal_mistake.py"), data, spec.formula)
    check = wrong.checks["random_effects"]
    assert check.verdict == "fail" and wrong.verdict == "fail"
    assert "not positive definite" in check.diagnosis
    assert "Apply node" not in check.diagnosis  # PyTensor's dump is cut to its first line


def test_lkj_cholesky_cov_prior_density_is_read(sleepstudy):
    from scipy import stats

    from harness.audit.draws import user_prior_draws
    from harness.audit.prior_share import user_log_prior
    from harness.model.spec import build_design

    data, spec = sleepstudy
    user = load_model_file(EXAMPLES / "sleepstudy_mvnormal.py")
    design = build_design(spec, data)
    model = user.build(design.data.reset_index(drop=True))
    prior = user_prior_draws(model, 50, 3)
    got, missing = user_log_prior(model, user.mapping, design, prior)
    assert not missing and got is not None
    stds = prior["chol_stds"].values[0]
    corr = prior["chol_corr"].values[0]
    b = prior["b"].values[0]
    want = (
        stats.expon(scale=20.0).logpdf(stds).sum(axis=1)
        + np.linalg.slogdet(corr)[1]  # (eta - 1) log det R, eta = 2
        + stats.norm([250.0, 10.0], [50.0, 10.0]).logpdf(b).sum(axis=1)
        + stats.expon(scale=30.0).logpdf(prior["sigma"].values[0])
    )
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_efficiency_advises_without_changing_the_verdict(trial):
    from harness.audit.verdicts import CheckResult

    result = _run(
        load_model_file(EXAMPLES / "partially_clustered_matrix.py"), trial, TRIAL, sigma_by="arm"
    )
    for name in ("posterior", "posterior_harness"):
        result.checks[name] = CheckResult(name, "pass", "stand-in for a sampled pass")
    result.checks["efficiency"] = CheckResult("efficiency", "look", "10x slower")
    assert result.verdict == "pass"
    result.checks["posterior_harness"] = CheckResult("posterior_harness", "fail", "shifted")
    assert result.verdict == "fail"
