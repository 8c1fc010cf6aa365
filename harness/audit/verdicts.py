"""One audit check's outcome: a verdict, a diagnosis in words, and its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["ORDER", "CheckResult", "worst"]

#: Verdicts from best to worst; "incomplete" (a check did not run) outranks "look" so it
#: can never read as a pass.
ORDER = ("pass", "look", "incomplete", "unreliable", "fail")


@dataclass
class CheckResult:
    """One check: ``verdict`` from :data:`ORDER`, ``diagnosis`` in words, tidy ``tables``."""

    name: str
    verdict: str
    diagnosis: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (tables as lists of records)."""
        return {
            "name": self.name,
            "verdict": self.verdict,
            "diagnosis": self.diagnosis,
            "tables": {
                k: v.astype(object).where(v.notna(), None).to_dict("records")
                for k, v in self.tables.items()
            },
        }


def worst(verdicts: list[str]) -> str:
    """The worst verdict; an empty list is "incomplete" (nothing was checked)."""
    if not verdicts:
        return "incomplete"
    return max(verdicts, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER))
