"""Lighter C entry points for nutpie's numba backend: the same results, 2 s less compiling.

nutpie compiles a PyMC model into PyTensor's numba function for the log
density and its gradient, then wraps that function in a ``numba.cfunc`` that
the Rust sampler calls.  The wrapper copies the gradient with a whole-array
assignment (``out[...] = grad``) and checks it with ``np.all(np.isfinite(out))``;
numba builds its array-assignment and broadcasting machinery for those lines
afresh in every process (about 40 internal functions), and a cfunc cannot be
cached on disk.  That was about 2 s of every model's compile here (7.0-7.7 s
down to 5.2 s for a 578-row random-intercept model with PyTensor's numba cache
warm), in every new process: each design of ``report all``, each ``harness
compare``.

:func:`light_entry_points` swaps in wrappers that do the same work with
element loops, while nutpie compiles: same return codes (-1 wrong dimension,
1 error, 3 non-finite gradient, 4 non-finite log density; -1/-2 for the
expansion), same values, so the same draws for the same seed
(``tests/test_nutpie_entry.py`` compares both wrappers call by call and draw
by draw).  The two builders it replaces are nutpie internals: when a nutpie
release no longer has them with the parameters known here, nothing is
swapped and nutpie's own wrappers are used.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("harness")

#: nutpie's wrapper builders and the parameters they take (nutpie 0.13 to 0.16).
_BUILDERS = {
    "_make_c_logp_func": ["n_dim", "logp_fn", "user_data", "shared_logp", "shared_data"],
    "_make_c_expand_func": [
        "n_dim",
        "n_expanded",
        "expand_fn",
        "user_data",
        "shared_vars",
        "shared_data",
    ],
}

_LOCK = threading.Lock()


def _nutpie_module() -> Any | None:
    """nutpie's PyMC compile module, if it has the builders this module replaces."""
    try:
        from nutpie import compile_pymc
    except ImportError:
        return None
    for name, params in _BUILDERS.items():
        builder = getattr(compile_pymc, name, None)
        if builder is None or list(inspect.signature(builder).parameters) != params:
            return None
    if not callable(getattr(compile_pymc, "make_extraction_fn", None)):
        return None
    return compile_pymc


def make_logp_entry(
    n_dim: int, logp_fn: Any, user_data: Any, shared_logp: Any, shared_data: Any
) -> tuple[Any, Any]:
    """nutpie's ``_make_c_logp_func`` with element loops: ``(python function, C signature)``."""
    import numba
    import numpy as np
    from nutpie import compile_pymc

    extract = compile_pymc.make_extraction_fn(logp_fn, shared_data, shared_logp, user_data.dtype)
    c_sig = numba.types.int64(
        numba.types.uint64,
        numba.types.CPointer(numba.types.double),
        numba.types.CPointer(numba.types.double),
        numba.types.CPointer(numba.types.double),
        numba.types.voidptr,
    )

    def logp_entry(dim, x_, out_, logp_, user_data_):  # type: ignore[no-untyped-def]
        if dim != n_dim:
            return -1
        try:
            x = numba.carray(x_, (n_dim,))
            logp_val, grad = extract(x, user_data_)
            logp_[0] = logp_val
            finite = True
            for i in range(n_dim):
                value = grad[i]
                out_[i] = value
                if not np.isfinite(value):
                    finite = False
            if not finite:
                return 3
            if not np.isfinite(logp_val):
                return 4
        except Exception:  # numba: any error becomes a return code
            return 1
        return 0

    return logp_entry, c_sig


def make_expand_entry(
    n_dim: int, n_expanded: int, expand_fn: Any, user_data: Any, shared_vars: Any, shared_data: Any
) -> tuple[Any, Any]:
    """nutpie's ``_make_c_expand_func`` with an element loop: ``(python function, C signature)``."""
    import numba
    from nutpie import compile_pymc

    extract = compile_pymc.make_extraction_fn(expand_fn, shared_data, shared_vars, user_data.dtype)
    c_sig = numba.types.int64(
        numba.types.uint64,
        numba.types.uint64,
        numba.types.CPointer(numba.types.double),
        numba.types.CPointer(numba.types.double),
        numba.types.voidptr,
    )

    def expand_entry(dim, expanded, x_, out_, user_data_):  # type: ignore[no-untyped-def]
        if dim != n_dim:
            return -1
        if expanded != n_expanded:
            return -1
        try:
            x = numba.carray(x_, (n_dim,))
            (values,) = extract(x, user_data_)
            if values.size != n_expanded:
                return -2
            flat = values.ravel()
            for i in range(n_expanded):
                out_[i] = flat[i]
        except Exception:
            return -2
        return 0

    return expand_entry, c_sig


@contextlib.contextmanager
def light_entry_points() -> Iterator[bool]:
    """While inside, ``nutpie.compile_pymc_model(..., backend="numba")`` builds the lighter
    wrappers of this module; yields whether they are in place (False: nutpie's own).

    The swap is undone on exit, and a lock keeps two threads from swapping at once.
    """
    module = _nutpie_module()
    if module is None:
        log.debug("nutpie's wrapper builders are not the known ones: using nutpie's own")
        yield False
        return
    with _LOCK:
        saved = {name: getattr(module, name) for name in _BUILDERS}
        module._make_c_logp_func = make_logp_entry
        module._make_c_expand_func = make_expand_entry
        try:
            yield True
        finally:
            for name, builder in saved.items():
                setattr(module, name, builder)
