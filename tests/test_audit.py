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
