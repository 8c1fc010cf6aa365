"""What a simulation study is: conditions, fitters, seeds and the task each replicate runs.

A :class:`Study` is a data generator with known true values, a grid of
:class:`Condition` s and a list of :class:`Fitter` s.  One *task* is one
(condition, replicate, fitter); it simulates the replicate's data from the
replicate's seed, fits it and returns tidy rows.  Every fitter of a replicate
sees the same data set, so fitters are compared on paired data.

Seeds.  The replicate ``rep`` of the condition with index ``i`` uses
``SeedSequence(root, spawn_key=(i, rep))``, which is exactly
``SeedSequence(root).spawn(i + 1)[i].spawn(rep + 1)[rep]``: independent
streams from one root seed, and a mapping from (condition, replicate) to seed
that does not depend on how many replicates are asked for, which worker runs
them or in which order, so a resumed or extended study gets the same numbers.
``Condition.index`` is the condition's position in the *full* grid of its
study, so a sub-study (one condition of the grid) draws the same data sets as
the full study does for that condition.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("harness")

#: Columns every result row has, in this order (condition parameters follow ``condition``).
KEY_COLUMNS: tuple[str, ...] = (
    "study",
    "condition",
    "condition_index",
    "rep",
    "fitter",
    "parameter",
)
#: Result columns and their pandas dtypes.
RESULT_DTYPES: dict[str, str] = {
    "data_seed": "int64",
    "fit_seed": "int64",
    "truth": "float64",
    "estimate": "float64",
    "se_or_sd": "float64",
    "lower": "float64",
    "upper": "float64",
    "df": "float64",
    "p_value": "float64",
    "covered": "boolean",
    "rejected": "boolean",
    "converged": "boolean",
    "singular": "boolean",
    "rhat": "float64",
    "ess_bulk": "float64",
    "divergences": "Int64",
    "rank": "Int64",
    "n_draws": "Int64",
    "error": "string",
    "fit_seconds": "float64",
}
#: Columns that legitimately differ between two runs of the same study (timings).
VOLATILE_COLUMNS: tuple[str, ...] = ("fit_seconds",)


@dataclass(frozen=True)
class Condition:
    """One cell of a study's grid.

    Attributes
    ----------
    id : str
        Stable, readable identifier (used as the ``condition`` column).
    index : int
        Position in the full grid of the study; part of the seed's spawn key.
    params : mapping
        Generator arguments (numbers), also written as columns of every row.
    """

    id: str
    index: int
    params: Mapping[str, float | int]


@dataclass(frozen=True)
class Fitter:
    """One analysis applied to every replicate.

    Attributes
    ----------
    name : str
        Short name (the ``fitter`` column).
    function : callable
        ``function(data, truth=..., seed=..., **options) -> list[dict]``: one
        dict per parameter with ``parameter``, ``estimate``, ``se_or_sd``,
        ``lower``, ``upper``, ``p_value`` and diagnostics.  Must be a
        module-level function so worker processes can import it.
    description : str
        One sentence for the report.
    options : mapping
        Keyword arguments for ``function`` (sampler settings); recorded in the
        study manifest, so a resumed study refuses changed settings.
    max_reps : int, optional
        Run this fitter on the first ``max_reps`` replicates only (slow fitters).
    """

    name: str
    function: Callable[..., list[dict[str, Any]]]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    max_reps: int | None = None

    def settings(self) -> dict[str, Any]:
        """What identifies this fitter's results (for the manifest)."""
        return {
            "function": f"{self.function.__module__}.{self.function.__qualname__}",
            "options": {k: self.options[k] for k in sorted(self.options)},
        }


@dataclass(frozen=True)
class Study:
    """A data generator with known truth, a grid of conditions and fitters.

    Attributes
    ----------
    name : str
    description : str
        A paragraph for the report.
    generate : callable
        ``generate(params, seed) -> (data, truth)``: a DataFrame and a dict of
        true parameter values.  Module-level, for worker processes.
    conditions : sequence of Condition
    fitters : sequence of Fitter
    default_reps : int
    alpha : float
        Nominal Type I error of the tests (and 1 - level of the intervals).
    kind : {"frequentist", "sbc"}
        ``sbc`` studies are summarised by rank statistics.
    definitions : mapping
        Column name -> meaning, shown in the report (e.g. how ICC is defined).
    """

    name: str
    description: str
    generate: Callable[[Mapping[str, Any], int], tuple[pd.DataFrame, dict[str, float]]]
    conditions: Sequence[Condition]
    fitters: Sequence[Fitter]
    default_reps: int = 200
    alpha: float = 0.05
    kind: str = "frequentist"
    definitions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fitters]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.name!r}: fitter names must be unique, got {names}")
        ids = [c.id for c in self.conditions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"study {self.name!r}: condition ids must be unique, got {ids}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"study {self.name!r}: alpha must be in (0, 1), got {self.alpha}")

    @property
    def param_columns(self) -> list[str]:
        """Condition parameter names, in first-seen order."""
        seen: dict[str, None] = {}
        for condition in self.conditions:
            for key in condition.params:
                seen.setdefault(key, None)
        return list(seen)

    def fitter(self, name: str) -> Fitter:
        for fitter in self.fitters:
            if fitter.name == name:
                return fitter
        raise ValueError(
            f"study {self.name!r} has no fitter {name!r}; it has {[f.name for f in self.fitters]}"
        )

    def tasks(self, reps: int, root_seed: int) -> list[Task]:
        """Every task of ``reps`` replicates, replicate-major so early stops cover all cells."""
        if reps < 1:
            raise ValueError(f"reps must be at least 1, got {reps}")
        out = []
        for rep in range(reps):
            for condition in self.conditions:
                data_seed, fit_seed = replicate_seeds(root_seed, condition.index, rep)
                for fitter in self.fitters:
                    if fitter.max_reps is not None and rep >= fitter.max_reps:
                        continue
                    out.append(Task(self, condition, rep, fitter, root_seed, data_seed, fit_seed))
        return out

    def manifest(self, root_seed: int) -> dict[str, Any]:
        """What a results folder was made with (checked before resuming)."""
        return {
            "study": self.name,
            "root_seed": int(root_seed),
            "alpha": self.alpha,
            "conditions": {c.id: {"index": c.index, **dict(c.params)} for c in self.conditions},
            "fitters": {f.name: f.settings() for f in self.fitters},
        }


def replicate_seed_sequence(
    root_seed: int, condition_index: int, rep: int
) -> np.random.SeedSequence:
    """The SeedSequence of one replicate: ``SeedSequence(root).spawn(...)[i].spawn(...)[rep]``."""
    return np.random.SeedSequence(int(root_seed), spawn_key=(int(condition_index), int(rep)))


def replicate_seeds(root_seed: int, condition_index: int, rep: int) -> tuple[int, int]:
    """Two 32-bit seeds for one replicate: the data set's and the sampler's."""
    words = replicate_seed_sequence(root_seed, condition_index, rep).generate_state(2, np.uint32)
    return int(words[0]), int(words[1])


@dataclass(frozen=True)
class Task:
    """One (condition, replicate, fitter): picklable, run by :func:`run_task` anywhere."""

    study: Study
    condition: Condition
    rep: int
    fitter: Fitter
    root_seed: int
    data_seed: int
    fit_seed: int

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.condition.id, self.rep, self.fitter.name)


def run_task(task: Task) -> list[dict[str, Any]]:
    """Simulate the task's data set, fit it, and return its result rows.

    A fitter's ordinary failure (an R error, a sampler error) becomes a row
    with ``error`` set, so one bad replicate does not stop a study; a missing
    R installation is raised, since every other task would fail the same way.
    """
    from harness.engines.lme4 import RUnavailableError

    study, condition, fitter = task.study, task.condition, task.fitter
    data, truth = study.generate(condition.params, task.data_seed)
    started = time.perf_counter()
    try:
        rows = fitter.function(data, truth=truth, seed=task.fit_seed, **dict(fitter.options))
        error = None
    except RUnavailableError:
        raise
    except Exception as err:  # one failed fit is a result, not the end of the study
        log.warning(
            "%s/%s rep %d %s failed: %s", study.name, condition.id, task.rep, fitter.name, err
        )
        rows = [{"parameter": p} for p in truth]
        error = f"{type(err).__name__}: {err}"
    elapsed = time.perf_counter() - started
    out = []
    for row in rows:
        parameter = row["parameter"]
        value = float(truth[parameter]) if parameter in truth else math.nan
        full: dict[str, Any] = {
            "study": study.name,
            "condition": condition.id,
            "condition_index": condition.index,
            "rep": task.rep,
            "fitter": fitter.name,
            **dict(condition.params),
            "data_seed": task.data_seed,
            "fit_seed": task.fit_seed,
            "truth": value,
            **{k: v for k, v in row.items() if k != "truth"},
            "error": row.get("error", error),
            "fit_seconds": row.get("fit_seconds", elapsed),
        }
        lower = full.get("lower", math.nan)
        upper = full.get("upper", math.nan)
        p_value = full.get("p_value", math.nan)
        if _finite(lower) and _finite(upper) and _finite(value):
            full["covered"] = bool(lower <= value <= upper)
        if _finite(p_value):
            full["rejected"] = bool(p_value < study.alpha)
        out.append(full)
    return out


def _finite(value: Any) -> bool:
    return (
        value is not None
        and isinstance(value, (int, float, np.floating, np.integer))
        and math.isfinite(value)
    )


def rows_to_frame(rows: Sequence[Mapping[str, Any]], study: Study) -> pd.DataFrame:
    """Result rows as a DataFrame with the study's columns and fixed dtypes."""
    columns = [*KEY_COLUMNS[:3], *study.param_columns, *KEY_COLUMNS[3:], *RESULT_DTYPES]
    frame = pd.DataFrame(list(rows))
    for column in columns:
        if column not in frame:
            frame[column] = (
                pd.NA if RESULT_DTYPES.get(column) in ("boolean", "Int64", "string") else np.nan
            )
    frame = frame[columns]
    for column in ("study", "condition", "fitter", "parameter"):
        frame[column] = frame[column].astype("string")
    frame["condition_index"] = frame["condition_index"].astype("int64")
    frame["rep"] = frame["rep"].astype("int64")
    for column in study.param_columns:
        frame[column] = pd.to_numeric(frame[column]).astype("float64")
    for column, dtype in RESULT_DTYPES.items():
        if dtype == "boolean":
            frame[column] = frame[column].astype("boolean")
        elif dtype == "string":
            frame[column] = frame[column].astype("string")
        else:
            frame[column] = pd.to_numeric(frame[column]).astype(dtype)
    return frame


def sort_results(frame: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Canonical row order: condition, replicate, fitter (study order), parameter."""
    order = {f.name: i for i, f in enumerate(study.fitters)}
    keyed = frame.assign(_fitter_order=frame["fitter"].map(order).astype("float64"))
    keyed = keyed.sort_values(
        ["condition_index", "rep", "_fitter_order", "fitter", "parameter"], kind="stable"
    )
    return keyed.drop(columns="_fitter_order").reset_index(drop=True)
