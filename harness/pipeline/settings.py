"""Engine settings: what enters the cache keys, from defaults, the environment or the CLI."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

__all__ = ["SETTINGS_ENV", "FitSettings", "settings_from_args", "settings_from_env"]

#: Environment variables that override sampler settings (whole numbers >= 1).
SETTINGS_ENV = {
    "HARNESS_DRAWS": "draws",
    "HARNESS_TUNE": "tune",
    "HARNESS_CHAINS": "chains",
    "HARNESS_MAX_ROUNDS": "max_rounds",
}


@dataclass(frozen=True)
class FitSettings:
    """Engine settings that enter the cache keys.

    Parameters
    ----------
    draws, tune, chains : int
        PyMC draws and tuning steps per chain, and the number of chains.
    sampler : str
        ``"nutpie"``, ``"pymc"`` or ``"numpyro"``.
    target_accept : float
    profile : bool
        Profile-likelihood intervals for lme4's variance components.
    n_sims : int
        ``merTools::REsim`` draws (0 skips them).
    lme4_seed : int
        Seed of REsim; fixed so that a new PyMC seed leaves the lme4 fit cached.
    adaptive : bool
        Sample in rounds until the diagnostics hold (:mod:`harness.engines.adaptive`).
    max_rounds, max_draws, max_seconds
        The adaptive budget (:class:`harness.engines.adaptive.AdaptiveSettings`):
        sampler runs, post-warm-up draws over all runs (None: six times the
        first run's), and an optional cap in wall seconds (None: no cap, so
        the same seed gives the same result on any machine).  All three
        change results, so all enter the cache key.
    """

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    sampler: str = "nutpie"
    target_accept: float = 0.9
    profile: bool = True
    n_sims: int = 1000
    lme4_seed: int = 1
    adaptive: bool = True
    max_rounds: int = 8
    max_draws: int | None = None
    max_seconds: float | None = None

    def adaptive_settings(self) -> Any:
        """``AdaptiveSettings`` for :func:`harness.engines.pymc.fit_pymc`, or False."""
        if not self.adaptive:
            return False
        from harness.engines.adaptive import AdaptiveSettings

        return AdaptiveSettings(
            max_rounds=self.max_rounds, max_draws=self.max_draws, max_seconds=self.max_seconds
        )

    def lme4_part(self) -> dict[str, Any]:
        return {"profile": self.profile, "n_sims": self.n_sims, "lme4_seed": self.lme4_seed}

    def pymc_part(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "tune": self.tune,
            "chains": self.chains,
            "sampler": self.sampler,
            "target_accept": self.target_accept,
            "adaptive": self.adaptive,
            "max_rounds": self.max_rounds,
            "max_draws": self.max_draws,
            "max_seconds": self.max_seconds,
        }


def settings_from_env(base: FitSettings | None = None) -> FitSettings:
    """FitSettings with ``HARNESS_DRAWS``/``TUNE``/``CHAINS``/``MAX_ROUNDS`` applied."""
    settings = base or FitSettings()
    changes: dict[str, Any] = {}
    for variable, name in SETTINGS_ENV.items():
        text = os.environ.get(variable)
        if text is None or not text.strip():
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{variable}={text!r} must be a whole number") from None
        if value < 1:
            raise ValueError(f"{variable}={text!r} must be at least 1")
        changes[name] = value
    return dataclasses.replace(settings, **changes) if changes else settings


def settings_from_args(args: argparse.Namespace, base: FitSettings | None = None) -> FitSettings:
    """``base`` (default: :func:`settings_from_env`) with the command line's budget options."""
    settings = base if base is not None else settings_from_env()
    changes: dict[str, Any] = {}
    for name in ("max_rounds", "max_draws", "max_seconds"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {value}")
        changes[name] = value
    if getattr(args, "no_adaptive", False):
        changes["adaptive"] = False
    return dataclasses.replace(settings, **changes) if changes else settings
