"""Simulation studies: seeds, summaries with MC error, SBC uniformity, execution and resume.

The default tests run the ``smoke`` study (2 conditions x 3 replicates, lm /
lme4 / nlme) on local processes and on a Dask LocalCluster, and an
interrupted-then-resumed run.  The 200-replicate acceptance runs are ``slow``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.studies import partially_clustered as pc
from harness.studies import sbc
from harness.studies.command import (
    VOLATILE_COLUMNS,
    Fitter,
    Study,
    get_study,
    nominal_check,
    rank_uniformity,
    replicate_seed_sequence,
    replicate_seeds,
    run_study,
    summarise,
    verdicts,
)


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=list(VOLATILE_COLUMNS)).reset_index(drop=True)


# --------------------------------------------------------------------------- seeds, design


def test_replicate_seed_is_the_spawned_child():
    root = 20261121
    spawned = np.random.SeedSequence(root).spawn(6)[5].spawn(4)[3]
    direct = replicate_seed_sequence(root, 5, 3)
    assert direct.generate_state(4).tolist() == spawned.generate_state(4).tolist()
    assert replicate_seeds(root, 5, 3) != replicate_seeds(root, 5, 2)
    assert replicate_seeds(root, 5, 3) != replicate_seeds(root + 1, 5, 3)


def test_group_sd_gives_the_icc_and_grid_is_complete():
    grid = pc.full_grid()
    assert len(grid) == 4 * 2 * 2 * 2
    assert [c.index for c in grid] == list(range(32))
    for cell in grid:
        p = cell.params
        icc = p["group_sd"] ** 2 / (p["group_sd"] ** 2 + p["sigma_treatment"] ** 2)
        assert icc == pytest.approx(p["icc"], abs=1e-12)
        assert p["n_groups"] * p["group_size"] == pc.N_TREATED
    with pytest.raises(ValueError, match="icc"):
        pc.group_sd_from_icc(1.0, 1.0)


def test_generated_replicate_matches_its_condition():
    cell = next(c for c in pc.full_grid() if c.params["icc"] == 0.2 and c.params["group_size"] == 5)
    data, truth = pc.generate(cell.params, seed=7)
    assert truth == {"tx": cell.params["effect"]}
    treated = data[data["tx"] == 1]
    assert treated["group"].nunique() == 20 and len(treated) == 100
    assert (data["tx"] == 0).sum() == 100


def test_lm_fitter_is_the_pooled_t_test():
    data, _ = pc.generate(pc.full_grid()[5].params, seed=3)
    row = pc.fit_ols(data, {"tx": 0.0}, seed=0)[0]
    treated, control = data.loc[data["tx"] == 1, "y"], data.loc[data["tx"] == 0, "y"]
    test = stats.ttest_ind(treated, control, equal_var=True)
    assert row["estimate"] == pytest.approx(treated.mean() - control.mean(), rel=1e-12)
    assert row["p_value"] == pytest.approx(test.pvalue, rel=1e-10)
    assert row["df"] == len(data) - 2
    half = stats.t.ppf(0.975, row["df"]) * row["se_or_sd"]
    assert row["upper"] - row["estimate"] == pytest.approx(half)


def test_pymc_fitters_reuse_one_compiled_model_across_replicates():
    """Same structure key for every replicate of a condition: each worker compiles once."""
    from harness.engines.pymc import structure_key
    from harness.model.priors import resolve_priors
    from harness.model.spec import build_design

    cell = pc.type1_study().conditions[0]
    for spec in (pc.pymc_spec(False), pc.pymc_spec(True)):
        keys = set()
        for seed in range(4):
            design = build_design(spec, pc.generate(cell.params, seed)[0])
            keys.add(structure_key(design, resolve_priors(design)))
        assert len(keys) == 1, spec
    keys = set()
    for seed in range(4):
        design = build_design(sbc.SPEC, sbc.generate({"n_cafes": 20, "n_visits": 10}, seed)[0])
        keys.add(structure_key(design, resolve_priors(design)))
    assert len(keys) == 1


# --------------------------------------------------------------------------- summaries


def _constructed(n: int = 200) -> pd.DataFrame:
    """Replicates with known answers: estimates truth +/- 1, 10% misses, 15% rejections."""
    est = 0.5 + np.where(np.arange(n) % 2 == 0, 1.0, -1.0) + 0.1
    return pd.DataFrame(
        {
            "condition": "c",
            "condition_index": 0,
            "rep": np.arange(n),
            "fitter": "f",
            "parameter": "tx",
            "truth": 0.5,
            "estimate": est,
            "se_or_sd": 1.0,
            "covered": pd.array(np.arange(n) % 10 != 0, dtype="boolean"),
            "rejected": pd.array(np.arange(n) % 20 < 3, dtype="boolean"),
            "converged": pd.array([True] * n, dtype="boolean"),
            "singular": pd.array([pd.NA] * n, dtype="boolean"),
            "rhat": np.nan,
            "divergences": pd.array([pd.NA] * n, dtype="Int64"),
            "error": pd.array([pd.NA] * n, dtype="string"),
            "fit_seconds": 1.0,
        }
    )


def test_summary_measures_and_mc_errors_on_known_data():
    n = 200
    row = summarise(_constructed(n)).iloc[0]
    assert row["n"] == n and row["n_failed"] == 0
    assert row["bias"] == pytest.approx(0.1)
    sd = np.std(np.where(np.arange(n) % 2 == 0, 1.0, -1.0), ddof=1)
    assert row["bias_mcse"] == pytest.approx(sd / math.sqrt(n))
    assert row["emp_se"] == pytest.approx(sd)
    assert row["emp_se_mcse"] == pytest.approx(sd / math.sqrt(2 * (n - 1)))
    assert row["rmse"] == pytest.approx(math.sqrt(0.5 * 1.1**2 + 0.5 * 0.9**2))
    sq = np.where(np.arange(n) % 2 == 0, 1.1**2, 0.9**2)
    assert row["rmse_mcse"] == pytest.approx(np.std(sq, ddof=1) / math.sqrt(n) / (2 * row["rmse"]))
    assert row["coverage"] == pytest.approx(0.9)
    assert row["coverage_mcse"] == pytest.approx(math.sqrt(0.9 * 0.1 / n))
    assert row["rejection"] == pytest.approx(0.15)
    assert row["rejection_mcse"] == pytest.approx(math.sqrt(0.15 * 0.85 / n))
    assert row["rejection_kind"] == "power"


def test_failed_fits_are_counted_not_averaged():
    frame = _constructed(20)
    frame.loc[:4, "error"] = "RuntimeError: boom"
    frame.loc[:4, "estimate"] = 1e6
    row = summarise(frame).iloc[0]
    assert row["n"] == 15 and row["n_failed"] == 5
    assert abs(row["bias"]) < 2


def test_nominal_check_and_sentences():
    assert nominal_check(0.055, 200, 0.05)[0] == "holds"
    assert nominal_check(0.15, 200, 0.05)[0] == "above"
    assert nominal_check(0.90, 200, 0.95)[0] == "below"
    _verdict, z = nominal_check(0.08, 200, 0.05)
    assert z == pytest.approx(0.03 / math.sqrt(0.05 * 0.95 / 200))
    frame = _constructed(200).assign(truth=0.0)
    sentences = verdicts(summarise(frame))
    type1 = sentences[sentences["measure"] == "Type I error"].iloc[0]
    assert type1["n_above"] == 1
    assert "above the nominal 0.05 beyond Monte Carlo error" in type1["sentence"]


# --------------------------------------------------------------------------- SBC statistics


def test_rank_uniformity_accepts_uniform_and_rejects_skewed_ranks():
    rng = np.random.default_rng(1)
    uniform = rank_uniformity(rng.integers(0, 100, 400), 99)
    assert uniform["bins"] == 20 and uniform["uniform"]
    skewed = rank_uniformity(np.minimum(rng.integers(0, 100, 400), rng.integers(0, 100, 400)), 99)
    assert skewed["chi2_p"] < 1e-6 and skewed["outside_band"] and not skewed["uniform"]


def test_ecdf_band_has_its_simultaneous_coverage():
    n, n_draws, level = 100, 19, 0.95
    band = sbc.ecdf_band(n, n_draws, level=level, n_sims=2000, seed=3)
    rng = np.random.default_rng(11)
    outside = 0
    sims = 600
    for _ in range(sims):
        diff = sbc.ecdf_difference(rng.integers(0, n_draws + 1, n), n_draws)["diff"]
        outside += bool(np.any((diff < band["lower"]) | (diff > band["upper"])))
    # Discreteness makes the band a little conservative; it must not be anti-conservative.
    assert 0.01 <= outside / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


def test_sbc_prior_draws_follow_the_m14_1_priors():
    rng = np.random.default_rng(5)
    draws = pd.DataFrame([sbc.draw_prior(rng) for _ in range(4000)])
    assert draws["a"].mean() == pytest.approx(5.0, abs=0.1)
    assert draws["b"].std() == pytest.approx(0.5, abs=0.03)
    for column in ("sigma_a", "sigma_b", "sigma"):
        assert draws[column].min() > 0
        assert draws[column].mean() == pytest.approx(1.0, abs=0.06)
    # LKJ(2) for two terms: (rho + 1) / 2 ~ Beta(2, 2), variance 1/5 on the rho scale.
    assert draws["rho"].var() == pytest.approx(0.2, abs=0.015)
    data, truth = sbc.generate({"n_cafes": 20, "n_visits": 10}, seed=9)
    assert len(data) == 200 and set(truth) == set(sbc.PARAMETERS)


# --------------------------------------------------------------------------- execution (no R)


def _lm_study(fitters: list[Fitter] | None = None) -> Study:
    cells = [
        c
        for c in pc.full_grid()
        if c.params["effect"] == 0.0
        and c.params["group_size"] == 10
        and c.params["sd_ratio"] == 2.0
    ]
    fitters = fitters or [Fitter("lm", pc.fit_ols, "OLS")]
    return Study("lm_only", "lm on four cells", pc.generate, cells, fitters, default_reps=5)


_STOP_AT: dict[str, object] = {}


def _ols_interrupting(data, truth, seed):
    if _STOP_AT.get("seed") == seed:
        raise KeyboardInterrupt
    return pc.fit_ols(data, truth, seed)


def test_interrupted_study_resumes_to_the_uninterrupted_table(tmp_path: Path):
    whole = run_study(_lm_study(), tmp_path / "whole", reps=5, workers=1, progress=False)
    assert whole.complete and len(whole.results) == 20

    study = _lm_study([Fitter("lm", _ols_interrupting, "OLS")])
    # Stop (KeyboardInterrupt) at the 12th task, after two Parquet parts were flushed.
    _STOP_AT["seed"] = study.tasks(5, 20261121)[11].fit_seed
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path / "resumed", reps=5, workers=1, progress=False, flush_every=5)
    _STOP_AT.clear()
    parts = list((tmp_path / "resumed" / "results").glob("part-*.parquet"))
    assert len(parts) == 3  # 5 + 5 flushed, 1 flushed on the interrupt
    partial = pd.concat([pd.read_parquet(p) for p in parts])
    assert len(partial) == 11

    resumed = run_study(study, tmp_path / "resumed", reps=5, workers=1, progress=False)
    assert resumed.n_run == 9 and resumed.complete
    pd.testing.assert_frame_equal(_comparable(resumed.results), _comparable(whole.results))


def test_resume_refuses_another_root_seed(tmp_path: Path):
    run_study(_lm_study(), tmp_path, reps=1, workers=1, progress=False)
    with pytest.raises(ValueError, match="root seed"):
        run_study(_lm_study(), tmp_path, reps=1, workers=1, progress=False, root_seed=1)


def test_more_replicates_extend_and_fewer_select(tmp_path: Path):
    first = run_study(_lm_study(), tmp_path, reps=2, workers=1, progress=False)
    more = run_study(_lm_study(), tmp_path, reps=4, workers=1, progress=False)
    assert more.n_run == 8
    pd.testing.assert_frame_equal(
        _comparable(more.results[more.results["rep"] < 2]), _comparable(first.results)
    )
    fewer = run_study(_lm_study(), tmp_path, reps=1, workers=1, progress=False)
    assert fewer.n_run == 0 and set(fewer.results["rep"]) == {0}


def test_report_is_self_contained(tmp_path: Path):
    from harness.studies.command import study_tables, write_study_report

    study = _lm_study()
    run = run_study(study, tmp_path, reps=5, workers=1, progress=False)
    tables = study_tables(study, run.results)
    path = write_study_report(
        study,
        run.results,
        tmp_path / "report.html",
        run_info={"reps": 5, "root_seed": run.root_seed, "n_rows": len(run.results)},
        tables=tables,
    )
    html = path.read_text()
    assert "data:image/png;base64," in html
    assert 'src="http' not in html and "<script src" not in html
    for sentence in tables.verdicts["sentence"]:
        assert sentence.replace("&", "&amp;") in html
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- execution with R


@pytest.fixture(scope="module")
def smoke_local(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_local")
    return run_study(get_study("smoke"), out, reps=3, workers=2, progress=False)


@pytest.mark.r
def test_smoke_study_runs_on_local_processes(smoke_local):
    frame = smoke_local.results
    assert smoke_local.complete and smoke_local.executor == "processes(2)"
    assert len(frame) == 2 * 3 * 3 and frame["error"].isna().all()
    lme4 = frame[frame["fitter"] == "lme4"]
    assert (lme4["df"] < 200).all() and lme4["p_value"].between(0, 1).all()
    # The same data set is given to every fitter of a replicate: lm's estimate is
    # the difference in arm means, which the mixed models reproduce at ICC 0.
    per_rep = frame.groupby(["condition", "rep"])["data_seed"].nunique()
    assert (per_rep == 1).all()


@pytest.mark.r
def test_dask_local_cluster_gives_the_local_table(smoke_local, tmp_path: Path):
    distributed = pytest.importorskip("distributed")
    from harness.child_processes import prepare_child_environment

    prepare_child_environment()  # this process already runs R (see its docstring)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_dask = run_study(get_study("smoke"), tmp_path, reps=3, scheduler=client, progress=False)
    assert on_dask.executor.startswith("dask(")
    pd.testing.assert_frame_equal(_comparable(on_dask.results), _comparable(smoke_local.results))


@pytest.mark.r
def test_cli_study_writes_report(tmp_path: Path, capsys):
    from harness.cli import main

    code = main(["study", "smoke", "--reps", "1", "--workers", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "smoke" / "report.html").is_file()
    assert (tmp_path / "smoke" / "summary.csv").is_file()
    assert "lme4: Type I error" in out
    assert main(["study", "list"]) == 0


# --------------------------------------------------------------------------- slow: acceptance


@pytest.mark.slow
@pytest.mark.r
@pytest.mark.sampling
def test_acceptance_type1_partially_clustered(tmp_path: Path):
    """200 replicates at ICC 0.1, SD ratio 2, effect 0: lm inflated; the hetero model not."""
    study = get_study("partially_clustered_type1")
    run = run_study(study, tmp_path, reps=200, progress=False)
    summary = summarise(run.results).set_index("fitter")
    lm = summary.loc["lm"]
    assert nominal_check(lm["rejection"], int(lm["n"]), 0.05)[0] == "above"
    satt = summary.loc["nlme_hetero_satt"]
    assert nominal_check(satt["rejection"], int(satt["n"]), 0.05)[0] == "holds"


@pytest.mark.slow
@pytest.mark.sampling
def test_acceptance_cafe_sbc(tmp_path: Path):
    """SBC of the cafe model: no rank non-uniformity at the 1% level over 200 replicates."""
    study = get_study("cafe_sbc")
    run = run_study(study, tmp_path, reps=200, progress=False)
    table = sbc.sbc_summary(run.results, alpha=0.01)
    assert (table["n"] >= 195).all()
    assert table["uniform"].all(), table.to_string()
