"""Continued nutpie chains: how a sampler that stops is reported (no real sampler needed).

The draw-for-draw equality of continued chains with longer runs is checked on real
nutpie chains in ``tests/test_adaptive.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.engines.samplers import ExtendableChains, SamplerFailed


class PanicException(BaseException):
    """Named as pyo3's: how a Rust panic in nutpie reaches Python (not an Exception)."""


class Batch:
    def __init__(self, rows: int) -> None:
        self.num_rows = rows


class StubSampler:
    """nutpie's background sampler as ExtendableChains uses it, with scripted progress."""

    def __init__(self, rows: list[list[int]], finished=False, wait_raises=None) -> None:
        self.rows, self.finished, self.wait_raises = list(rows), finished, wait_raises
        self.paused = self.cancelled = self.resumed = False
        self._sampler = SimpleNamespace(inspect=self._inspect)

    def _inspect(self):
        now = self.rows.pop(0) if len(self.rows) > 1 else self.rows[0]
        return SimpleNamespace(get_arrow_trace=lambda: ([Batch(r) for r in now], []))

    @property
    def is_finished(self):
        if isinstance(self.finished, BaseException):
            raise self.finished
        return self.finished

    def resume(self):
        self.resumed = True

    def pause(self):
        self.paused = True

    def wait(self):
        if self.wait_raises is not None:
            raise self.wait_raises

    def cancel(self):
        self.cancelled = True


def _chains(stub: StubSampler, tune: int = 10) -> ExtendableChains:
    chains = object.__new__(ExtendableChains)
    chains.tune, chains.chains, chains.capacity, chains.length = tune, 2, 100, 0
    chains._closed = False
    chains._sampler = stub
    return chains


def test_chains_are_paused_once_every_chain_has_its_draws():
    stub = StubSampler([[5, 3], [30, 12], [40, 35]])
    chains = _chains(stub)
    chains._wait_for(25)  # 10 warm-up + 25 draws: the slowest chain decides
    assert stub.resumed and stub.paused and stub.rows == [[40, 35]]


def test_a_panic_met_while_waiting_is_a_failed_run_not_the_end_of_the_process():
    panic = PanicException("Could not initialize state because of bad initial gradient")
    chains = _chains(StubSampler([[0, 0]], finished=panic))
    with pytest.raises(SamplerFailed, match="bad initial gradient"):
        chains._wait_for(25)


def test_a_sampler_that_stopped_early_says_so():
    chains = _chains(StubSampler([[12, 4]], finished=True, wait_raises=PanicException("boom")))
    with pytest.raises(SamplerFailed, match="boom"):
        chains._wait_for(25)
    quiet = _chains(StubSampler([[12, 4]], finished=True))
    with pytest.raises(SamplerFailed, match="finished with 4 of 35 iterations"):
        quiet._wait_for(25)


def test_an_interrupt_is_not_turned_into_a_failed_run():
    chains = _chains(StubSampler([[0, 0]], finished=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        chains._wait_for(25)


def test_closed_chains_refuse_more_draws_and_close_once():
    stub = StubSampler([[0, 0]])
    chains = _chains(stub)
    chains.close()
    chains.close()
    assert stub.cancelled
    with pytest.raises(RuntimeError, match="closed"):
        chains.draws_up_to(5)
    with pytest.raises(ValueError, match="capacity"):
        _chains(StubSampler([[0, 0]])).draws_up_to(500)
