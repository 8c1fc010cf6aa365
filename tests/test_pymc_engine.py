"""The PyMC model's structure, without sampling: indexing, data containers, cache keys."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import harness as hz
from harness.checks.marginal import compile_mode
from harness.engines.pymc import (
    BayesFit,
    build_model,
    model_data,
    pack_data,
    refit,
    structure,
    structure_key,
)
from harness.engines.samplers import SAMPLERS, require_sampler
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, build_design

CAFE = hz.datasets.load("cafe")[1]


def _design(spec: ModelSpec, data: pd.DataFrame):
    design = build_design(spec, data)
    return design, resolve_priors(design)


def test_importing_harness_imports_no_sampler():
    code = (
        "import sys, harness, harness.engines.pymc, harness.engines.samplers\n"
        "heavy = [m for m in ('pymc', 'pytensor', 'nutpie', 'numba', 'numpyro', 'jax') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at harness import time: {out.stdout.strip()}"


def test_unknown_or_missing_sampler_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown sampler 'stan'"):
        require_sampler("stan")
    assert require_sampler("nutpie") == "nutpie"
    assert set(SAMPLERS) == {"nutpie", "pymc", "numpyro"}
    try:
        import numpyro  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"numpyro.*pip install"):
            hz.fit_pymc(CAFE, hz.datasets.simulate_cafe(), sampler="numpyro")
    else:  # pragma: no cover - the ready environment has no numpyro
        assert require_sampler("numpyro") == "numpyro"


def test_structure_key_ignores_data_values_but_not_structure():
    keys = {structure_key(*_design(CAFE, hz.datasets.simulate_cafe(seed=s))) for s in (1, 2, 3)}
    assert len(keys) == 1, "the same structure must reuse one compiled model"
    fewer = structure_key(*_design(CAFE, hz.datasets.simulate_cafe(n_cafes=19)))
    assert fewer not in keys
    uncorrelated = CAFE.with_(formula="wait ~ 1 + afternoon + (1 + afternoon || cafe)")
    assert structure_key(*_design(uncorrelated, hz.datasets.simulate_cafe())) not in keys


def test_all_data_live_in_the_packed_data_containers():
    """What a refit swaps is exactly what the model reads: two containers, unpacked by name."""
    from pytensor.compile.sharedvalue import SharedVariable

    for name in ("cafe", "sleepstudy", "partially_clustered", "partially_clustered_hetero"):
        data, spec = hz.datasets.load(name)
        design, priors = _design(spec, data)
        model = build_model(design, priors)
        values = model_data(design, priors)
        packed, layout = pack_data(values)
        shared = {n: v for n, v in model.named_vars.items() if isinstance(v, SharedVariable)}
        assert set(shared) == set(packed) == {"data_float", "data_int"}, name
        for key, value in packed.items():
            np.testing.assert_array_equal(shared[key].get_value(), value, err_msg=f"{name}: {key}")
        for key, (container, start, shape) in layout.items():
            size = int(np.prod(shape))
            unpacked = packed[container][start : start + size].reshape(shape)
            np.testing.assert_array_equal(unpacked, values[key], err_msg=f"{name}: {key}")
        observed = model.rvs_to_values[model["y_obs"]].eval()
        np.testing.assert_array_equal(observed, design.y, err_msg=name)


def _mixed_data(n_groups: int, per_group: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=g.size)
    h = rng.integers(0, 4, size=g.size)
    y = 1.0 + 0.5 * x + rng.normal(size=n_groups)[g] + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "h": h.astype(str)})


def test_model_is_built_by_indexing_not_a_dense_z():
    """No variable in the log density is as large as n x groups (a dense Z would be)."""
    from pytensor.graph.traversal import ancestors

    spec = ModelSpec("y ~ 1 + x + (1 + x | g) + (1 | h)")
    design, priors = _design(spec, _mixed_data(n_groups=400, per_group=5))
    dense = design.n * design.blocks[0].n_levels
    model = build_model(design, priors)
    graph = [model.logp(), *model.deterministics]
    sizes = [
        int(np.prod(v.type.shape))
        for v in ancestors(graph)
        if hasattr(v.type, "shape") and None not in v.type.shape
    ]
    assert len(sizes) > 20, "static shapes should be known for most of the graph"
    # The packed data hold y, X and the Z columns of each block: n x (1 + p + sum k), no more.
    columns = 1 + len(design.fixed_terms) + sum(b.n_terms for b in design.blocks)
    assert max(sizes) <= design.n * columns + 100, (
        f"largest array has {max(sizes)} elements (dense Z: {dense})"
    )
    assert dense > 20 * design.n * columns


def test_log_density_equals_the_dense_z_formula():
    """The indexed mean equals X beta + Z u with lme4's Z, so indexing changes cost, not model."""
    spec = ModelSpec("y ~ 1 + x + (1 + x | g) + (1 | h)")
    design, priors = _design(spec, _mixed_data(n_groups=12, per_group=6))
    model = build_model(design, priors)
    rng = np.random.default_rng(5)
    point = model.initial_point()
    for name in point:
        point[name] = rng.normal(size=np.shape(point[name])) * 0.5
    outputs = model.replace_rvs_by_values([model[n] for n in ("beta", "u_g", "u_h", "sigma")])
    # Evaluated at one point: the checks' NumPy mode, not a C compile of every node.
    mode = compile_mode()
    deterministic = model.compile_fn(
        outputs, inputs=model.value_vars, on_unused_input="ignore", mode=mode
    )
    beta, u_g, u_h, sigma = deterministic(point)
    # lme4's Z puts blocks in decreasing number of levels: g (12) before h (4).
    u = np.concatenate([u_g.ravel(), u_h.ravel()])
    mu = design.X.to_numpy() @ beta + design.Z() @ u
    expected = stats.norm.logpdf(design.y, mu, sigma).sum()
    logp_obs = model.compile_logp(vars=[model["y_obs"]], sum=True, mode=mode)
    assert float(logp_obs(point)) == pytest.approx(expected, rel=1e-10)


def test_refit_refuses_data_of_another_structure_naming_the_change():
    design, priors = _design(CAFE, hz.datasets.simulate_cafe())
    fit = BayesFit(
        spec=CAFE,
        design=design,
        idata=None,
        sampler="nutpie",
        seed=1,
        draws=10,
        tune=10,
        chains=1,
        priors=priors,
        compile_seconds=0.0,
        sample_seconds=0.0,
        model_code="",
        settings={"structure": structure(design, priors), "target_accept": 0.8},
    )
    with pytest.raises(ValueError, match=r"block cafe: '20 levels.*-> '19 levels"):
        refit(fit, hz.datasets.simulate_cafe(n_cafes=19))
