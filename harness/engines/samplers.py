"""Samplers for a PyMC model, and the in-process cache of compiled nutpie models.

nutpie (numba backend) is the default: once compiled, it samples the harness's
models several times faster than PyMC's own NUTS.  Its compilation is the
expensive part (seconds to tens of seconds), so one compiled model is kept per
model *structure* for the life of the process and refitted to new data of the
same structure by swapping the values of its ``pm.Data`` containers
(:meth:`nutpie.compile_pymc.CompiledPyMCModel.with_data`).

PyMC's sampler and numpyro are selectable by name; nutpie, numba, pymc,
numpyro and jax are imported only by the function that needs them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("harness")


class SamplerFailed(RuntimeError):
    """A sampler run that could not finish (nutpie panicked: e.g. no valid initial point)."""


SAMPLERS: tuple[str, ...] = ("nutpie", "pymc", "numpyro")

#: How many compiled structures one process keeps (each holds its machine code and data).
CACHE_SIZE = 16


def check_sampler(name: str) -> str:
    """Return ``name`` if it is a known sampler, else raise a ValueError naming the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return name


def require_sampler(name: str) -> str:
    """Check that a sampler is known and its package importable, before any work is done.

    Raises
    ------
    ValueError
        For an unknown name, or when the sampler's package is not installed
        (naming what to install).
    """
    check_sampler(name)
    from importlib.util import find_spec

    needs = {"nutpie": ("nutpie", "numba"), "pymc": ("pymc",), "numpyro": ("numpyro", "jax")}[name]
    missing = [package for package in needs if find_spec(package) is None]
    if missing:
        extra = " (pip install 'harness[numpyro]')" if name == "numpyro" else ""
        raise ValueError(
            f"sampler {name!r} needs {', '.join(missing)}, which is not installed{extra}"
        )
    return name


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- compiled cache


@dataclass
class _Entry:
    model: Any
    compiled: Any
    compile_seconds: float
    shared: dict[str, Any]


class CompiledCache:
    """Compiled nutpie models by structure key, least recently used dropped first.

    The PyMC model is kept next to its compiled form because nutpie's initial
    point function reads the model's own shared variables: a data swap updates
    both, so a refit starts where a fresh compile of the new data would.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: _Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                dropped, _ = self._entries.popitem(last=False)
                log.debug("dropped compiled model %s from the cache", dropped)


COMPILED = CompiledCache()


def _shared_variables(model: Any) -> dict[str, Any]:
    from pytensor.compile.sharedvalue import SharedVariable

    return {name: var for name, var in model.named_vars.items() if isinstance(var, SharedVariable)}


def compiled_nutpie(
    key: str,
    build: Callable[[], Any],
    values: Mapping[str, np.ndarray],
    skip: Callable[[Any], set[str]] | None = None,
) -> tuple[Any, float, bool]:
    """The compiled nutpie model for a structure, holding ``values`` as its data.

    Parameters
    ----------
    key : str
        Structure key: equal keys promise equal graphs (only data differ).
    build : callable
        Builds the PyMC model; called only when ``key`` is not cached.
    values : mapping
        The value of every ``pm.Data`` container, by name.
    skip : callable, optional
        Given the model, names of deterministics to leave out of the trace
        (the caller computes them after sampling, to keep the trace small).

    Returns
    -------
    compiled : nutpie CompiledModel
    compile_seconds : float
        0 when the structure was already compiled in this process.
    cached : bool
    """
    entry = COMPILED.get(key)
    if entry is None:
        import nutpie

        from harness import progress
        from harness.engines.nutpie_entry import light_entry_points

        with progress.stage("PyMC compile (nutpie, numba)"):
            started = time.perf_counter()
            model = build()
            var_names = None
            if skip is not None:
                left_out = skip(model)
                var_names = [v.name for v in model.unobserved_value_vars if v.name not in left_out]
            with light_entry_points():
                compiled = nutpie.compile_pymc_model(model, backend="numba", var_names=var_names)
            seconds = time.perf_counter() - started
        log.info("nutpie compiled the model in %.1f s", seconds)
        entry = _Entry(model, compiled, seconds, _shared_variables(model))
        COMPILED.put(key, entry)
        return _swap(entry, values), seconds, False
    return _swap(entry, values), 0.0, True


def _swap(entry: _Entry, values: Mapping[str, np.ndarray]) -> Any:
    """``entry.compiled`` with ``values`` in its data slots (and in the model's own)."""
    missing = sorted(set(entry.compiled.shared_data) - set(values))
    if missing:
        raise ValueError(f"no new values for the model's data {missing}")
    unknown = sorted(set(values) - set(entry.shared))
    if unknown:
        raise ValueError(f"the model has no data named {unknown}")
    for name, value in values.items():
        var = entry.shared[name]
        old = var.get_value(borrow=True)
        new = np.asarray(value, dtype=old.dtype)
        if new.shape != old.shape:
            raise ValueError(
                f"data {name!r} has shape {new.shape}, the compiled structure {old.shape}"
            )
        var.set_value(new)
    used = {name: values[name] for name in entry.compiled.shared_data}
    return entry.compiled.with_data(**used)


def sample_nutpie(
    compiled: Any,
    *,
    draws: int,
    tune: int,
    chains: int,
    seed: int,
    target_accept: float,
    progress: bool,
    cores: int | None = None,
    low_rank: bool = False,
) -> tuple[Any, float]:
    """Sample a compiled nutpie model; returns ``(idata, seconds)``.

    ``low_rank`` adapts nutpie's low-rank modified mass matrix instead of its
    diagonal one: fewer gradients per effective draw where posterior
    correlations remain (many groups, factors nested in a fixed effect), more
    work per gradient (``benchmarks/bench_geometry.py``).
    """
    import nutpie

    from harness import progress as progress_lines

    cores = min(chains, cores or available_cores())
    total = chains * (draws + tune)
    with progress_lines.stage(f"sampling {chains} chains x {tune}+{draws} draws") as stage:
        started = time.perf_counter()
        try:
            idata = nutpie.sample(
                compiled,
                draws=draws,
                tune=tune,
                chains=chains,
                cores=cores,
                seed=seed,
                # nutpie's own bar where a person watches a terminal.
                progress_bar=progress or progress_lines.is_terminal(),
                target_accept=target_accept,
                save_warmup=False,
                low_rank_modified_mass_matrix=low_rank,
            )
        except BaseException as err:
            # A Rust panic in nutpie (e.g. "bad initial gradient") reaches Python as pyo3's
            # PanicException, a BaseException that would end the whole process: it is a
            # failed run, which callers can record and survive.
            if type(err).__name__ != "PanicException":
                raise
            raise SamplerFailed(f"nutpie stopped: {err}") from err
        seconds = time.perf_counter() - started
        stage.detail = f"{total / max(seconds, 1e-9):.0f} draws/s"
    return idata, seconds


def sample_pymc(
    model: Any,
    *,
    draws: int,
    tune: int,
    chains: int,
    seed: int,
    target_accept: float,
    progress: bool,
    nuts_sampler: str = "pymc",
    cores: int | None = None,
) -> tuple[Any, float]:
    """Sample with ``pm.sample`` (PyMC's NUTS, or numpyro through PyMC)."""
    import pymc as pm

    require_sampler(nuts_sampler)
    cores = min(chains, cores or available_cores())
    started = time.perf_counter()
    with model:
        idata = pm.sample(
            draws=draws,
            tune=tune,
            chains=chains,
            cores=cores,
            random_seed=seed,
            target_accept=target_accept,
            progressbar=progress,
            nuts_sampler=nuts_sampler,
            compute_convergence_checks=False,
        )
    return idata, time.perf_counter() - started


# --------------------------------------------------------------------------- extendable chains

#: Longest pause between two looks at a running sampler's progress, in seconds.
POLL_MAX_SECONDS = 2.0


def _is_panic(err: BaseException) -> bool:
    # A Rust panic in nutpie reaches Python as pyo3's PanicException, a BaseException.
    return type(err).__name__ == "PanicException"


class ExtendableChains:
    """nutpie chains that can be sampled further after their first draws were taken.

    nutpie samples in background threads that can be paused and resumed
    (``nutpie.sample(..., blocking=False)``).  The chains are started with room
    for ``capacity`` draws each, paused as soon as every chain has its first
    ``draws``, and resumed by :meth:`extend` when more are wanted: the longer
    chains continue where they stopped, with the warm-up's step size and mass
    matrix, so no warm-up is repeated and no draw is thrown away.

    Each chain's draws depend on the seed alone, not on when it was paused:
    the first ``n`` draws of a chain are those of a run of ``n`` draws (every
    chain runs in its own thread, ``cores = chains``, so that none waits for
    another to finish its capacity), and the returned draws are cut at exactly
    the requested length.  Draws a chain made beyond it while the others
    caught up are sampled but never used.
    """

    def __init__(
        self,
        compiled: Any,
        *,
        draws: int,
        tune: int,
        chains: int,
        capacity: int,
        seed: int,
        target_accept: float,
        progress: bool,
        low_rank: bool,
    ) -> None:
        import nutpie

        from harness import progress as progress_lines

        self.tune = int(tune)
        self.chains = int(chains)
        self.capacity = int(max(capacity, draws))
        self.length = 0
        self._closed = False
        try:
            self._sampler = nutpie.sample(
                compiled,
                draws=self.capacity,
                tune=self.tune,
                chains=self.chains,
                cores=self.chains,
                seed=seed,
                progress_bar=progress or progress_lines.is_terminal(),
                target_accept=target_accept,
                save_warmup=False,
                low_rank_modified_mass_matrix=low_rank,
                blocking=False,
            )
        except BaseException as err:
            if not _is_panic(err):
                raise
            raise SamplerFailed(f"nutpie stopped: {err}") from err

    def _rows(self) -> list[int]:
        """Iterations (warm-up included) each chain has finished so far."""
        draws, _ = self._sampler._sampler.inspect().get_arrow_trace()
        return [int(batch.num_rows) for batch in draws]

    def _finished(self) -> bool:
        try:
            return bool(self._sampler.is_finished)
        except TimeoutError:  # nutpie's way of saying "still running"
            return False

    def _wait_for(self, length: int) -> None:
        """Run the chains until each has ``length`` draws after warm-up, then pause them.

        Whatever stops nutpie on the way (a panic such as "bad initial gradient",
        raised by whichever call meets it) is a :class:`SamplerFailed`.
        """
        need = self.tune + length
        started = time.perf_counter()
        try:
            self._sampler.resume()
            while True:
                rows = self._rows()
                done = min(rows) if rows else 0
                if done >= need:
                    break
                if self._finished():
                    self._sampler.wait()  # raises what stopped it
                    raise SamplerFailed(
                        f"nutpie finished with {done} of {need} iterations per chain"
                    )
                # Look again about when the slowest chain should be done (never busy-wait).
                elapsed = time.perf_counter() - started
                rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
                left = (need - done) / rate if rate > 0 else POLL_MAX_SECONDS
                time.sleep(min(POLL_MAX_SECONDS, max(0.02, 0.5 * left)))
            self._sampler.pause()
        except SamplerFailed:
            raise
        except BaseException as err:
            if not _is_panic(err) and not isinstance(err, Exception):
                raise  # KeyboardInterrupt, SystemExit
            raise SamplerFailed(f"nutpie stopped: {err}") from err

    def draws_up_to(self, length: int, *, announce: bool = True) -> tuple[Any, float]:
        """The chains' first ``length`` draws after warm-up, sampling on as needed.

        Returns ``(idata, seconds)``: the draws (sample stats too) cut at
        ``length``, and the seconds spent sampling for this call.  With
        ``announce`` False no progress line of its own (the caller reports).
        """
        from harness import progress as progress_lines

        if self._closed:
            raise RuntimeError("these chains were closed")
        if length > self.capacity:
            raise ValueError(f"{length} draws per chain exceed the capacity {self.capacity}")
        label = (
            f"sampling {self.chains} chains x {self.tune}+{length} draws"
            if self.length == 0
            else f"extending {self.chains} chains from {self.length} to {length} draws"
        )
        total = self.chains * (length - self.length + (self.tune if self.length == 0 else 0))
        with progress_lines.stage(label) if announce else nullcontext() as stage:
            started = time.perf_counter()
            self._wait_for(length)
            idata = self._sampler.inspect()
            seconds = time.perf_counter() - started
            if stage is not None:
                stage.detail = f"{total / max(seconds, 1e-9):.0f} draws/s"
        self.length = max(self.length, length)
        return _cut(idata, length), seconds

    def close(self) -> None:
        """Stop the threads and drop the draws (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._sampler.cancel()
            except BaseException as err:  # a panicked sampler has nothing left to stop
                if not _is_panic(err) and not isinstance(err, Exception):
                    raise

    def __del__(self) -> None:
        self.close()


def _cut(idata: Any, length: int) -> Any:
    """``idata`` with every group that has draws cut to its first ``length``."""
    import arviz as az

    groups = {}
    for name in idata.groups():
        group = getattr(idata, name)
        if "draw" in group.dims:
            group = group.isel(draw=slice(0, length))
        groups[name] = group
    return az.InferenceData(**groups)
