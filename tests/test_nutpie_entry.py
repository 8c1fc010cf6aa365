"""The lighter nutpie entry points compute what nutpie's own do, call by call and draw by draw."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

pytest.importorskip("nutpie")
pytest.importorskip("numba")

from harness.engines import nutpie_entry


def _model():  # type: ignore[no-untyped-def]
    """A small varying-intercept model with a data container, as the harness builds them."""
    import pymc as pm

    rng = np.random.default_rng(3)
    group = np.repeat(np.arange(6), 5)
    y = 1.0 + rng.normal(0, 0.7, 6)[group] + rng.normal(0, 0.4, group.size)
    with pm.Model(coords={"g": np.arange(6)}) as model:
        data = pm.Data("data_float", y, shape=y.shape)
        mu0 = pm.Normal("mu0", 0, 5)
        sd = pm.HalfNormal("sd", 1)
        z = pm.Normal("z", 0, 1, dims="g")
        sigma = pm.HalfNormal("sigma", 1)
        pm.Normal("y", mu0 + z[group] * sd, sigma, observed=data)
    return model


@pytest.fixture(scope="module")
def both():  # type: ignore[no-untyped-def]
    import nutpie

    own = nutpie.compile_pymc_model(_model(), backend="numba")
    with nutpie_entry.light_entry_points() as swapped:
        light = nutpie.compile_pymc_model(_model(), backend="numba")
    assert swapped, "nutpie's wrapper builders changed: update harness/engines/nutpie_entry.py"
    return own, light


def _call_logp(compiled, x: np.ndarray, dim: int | None = None):  # type: ignore[no-untyped-def]
    grad = np.full(x.size, -7.0)
    logp = np.full(1, -7.0)
    dptr = ctypes.POINTER(ctypes.c_double)
    code = compiled.compiled_logp_func.ctypes(
        x.size if dim is None else dim,
        x.ctypes.data_as(dptr),
        grad.ctypes.data_as(dptr),
        logp.ctypes.data_as(dptr),
        compiled.user_data.ctypes.data_as(ctypes.c_void_p),
    )
    return code, logp[0], grad


def _call_expand(compiled, x: np.ndarray, n_expanded: int):  # type: ignore[no-untyped-def]
    out = np.full(n_expanded, -7.0)
    dptr = ctypes.POINTER(ctypes.c_double)
    code = compiled.compiled_expand_func.ctypes(
        x.size,
        n_expanded,
        x.ctypes.data_as(dptr),
        out.ctypes.data_as(dptr),
        compiled.user_data.ctypes.data_as(ctypes.c_void_p),
    )
    return code, out


def test_log_density_gradient_and_return_codes_match_nutpies(both) -> None:  # type: ignore[no-untyped-def]
    own, light = both
    n = own.n_dim
    assert light.n_dim == n
    rng = np.random.default_rng(0)
    points = [rng.normal(0, 1, n) for _ in range(3)]
    points.append(np.full(n, 40.0))  # exp(40) scales: a finite but extreme point
    points.append(np.r_[np.nan, np.zeros(n - 1)])  # not finite: code 3
    for x in points:
        code_own, logp_own, grad_own = _call_logp(own, x)
        code_light, logp_light, grad_light = _call_logp(light, x)
        assert code_light == code_own
        np.testing.assert_array_equal(grad_light, grad_own)
        np.testing.assert_array_equal(logp_light, logp_own)
    assert _call_logp(own, points[0], dim=n + 1)[0] == _call_logp(light, points[0], dim=n + 1)[0]
    assert _call_logp(light, points[0], dim=n + 1)[0] == -1
    assert _call_logp(light, points[-1])[0] == 3


def test_expansion_matches_nutpies(both) -> None:  # type: ignore[no-untyped-def]
    own, light = both
    n_expanded = own.n_expanded
    x = np.random.default_rng(1).normal(0, 1, own.n_dim)
    code_own, out_own = _call_expand(own, x, n_expanded)
    code_light, out_light = _call_expand(light, x, n_expanded)
    assert code_own == code_light == 0
    np.testing.assert_array_equal(out_light, out_own)
    assert _call_expand(light, x, n_expanded + 1)[0] == -1


def test_same_seed_same_draws(both) -> None:  # type: ignore[no-untyped-def]
    import nutpie

    own, light = both
    kwargs = {"draws": 60, "tune": 60, "chains": 1, "seed": 11, "progress_bar": False}
    draws_own = nutpie.sample(own, **kwargs).posterior
    draws_light = nutpie.sample(light, **kwargs).posterior
    for name in ("mu0", "sd", "z", "sigma"):
        np.testing.assert_array_equal(draws_light[name].values, draws_own[name].values)


def test_swap_is_undone_and_skipped_for_unknown_builders(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from nutpie import compile_pymc

    before = compile_pymc._make_c_logp_func
    with nutpie_entry.light_entry_points() as swapped:
        assert swapped and compile_pymc._make_c_logp_func is nutpie_entry.make_logp_entry
    assert compile_pymc._make_c_logp_func is before

    def changed(n_dim, logp_fn, user_data, shared_logp, shared_data, extra):  # type: ignore[no-untyped-def]
        raise AssertionError("not called")

    monkeypatch.setattr(compile_pymc, "_make_c_logp_func", changed)
    with nutpie_entry.light_entry_points() as swapped:
        assert not swapped
        assert compile_pymc._make_c_logp_func is changed
