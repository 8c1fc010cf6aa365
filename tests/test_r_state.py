"""The harness's own ``set.seed`` calls leave R's random stream as it was."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.r


def _seed_state(ro) -> np.ndarray | None:
    has = ro.r('exists(".Random.seed", envir = globalenv())')[0]
    return np.asarray(ro.r(".Random.seed")) if has else None


def test_cafe_simulation_restores_the_random_state() -> None:
    lme4 = pytest.importorskip("harness.engines.lme4")
    if not lme4.r_available():
        pytest.skip("R with lme4 is not available")
    import rpy2.robjects as ro

    ro.r("set.seed(123)")
    before = _seed_state(ro)
    cafes = lme4.simulate_cafe_in_r(20, 10)
    assert len(cafes) == 200
    after = _seed_state(ro)
    assert before is not None and after is not None
    np.testing.assert_array_equal(before, after)
    # And the stream continues as if the harness had not drawn anything.
    drawn = list(ro.r("runif(3)"))
    ro.r("set.seed(123)")
    assert drawn == list(ro.r("runif(3)"))
