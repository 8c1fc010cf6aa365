"""Load a user's ``MODEL.py``: their ``build(data) -> pymc.Model`` and ``MAPPING``.

Loading runs the user's own file (that is the point of an audit); nothing else
read from data or from the command line ever becomes code.
"""

from __future__ import annotations

import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AuditError", "UserModel", "load_model_file"]


class AuditError(ValueError):
    """The user's model file or its MAPPING cannot be audited as given."""


@dataclass(frozen=True)
class UserModel:
    """What ``MODEL.py`` defines: the model builder and the mapping to the harness's rows."""

    build: Callable[[Any], Any]
    mapping: Mapping[str, Any]
    source: str = ""
    path: str = ""


def load_model_file(path: str | Path) -> UserModel:
    """Run ``MODEL.py`` (the user's code) and return its ``build`` and ``MAPPING``.

    Parameters
    ----------
    path : str or Path
        A Python file defining ``build(data: pandas.DataFrame) -> pymc.Model``
        and ``MAPPING`` (a dict from the harness's row names to variable names
        of the model or callables on the posterior Dataset).

    Returns
    -------
    UserModel

    Raises
    ------
    AuditError
        If the file is missing, or does not define a callable ``build`` and a dict ``MAPPING``.
    """
    file = Path(path)
    if not file.is_file():
        raise AuditError(f"model file {str(file)!r} not found")
    source = file.read_text(encoding="utf-8")
    # run_path executes the file as __main__-less module code: its `if __name__ == "__main__"`
    # block (sampling, plotting in the user's own script) does not run.
    namespace = runpy.run_path(str(file), run_name="harness_audit_model")
    build = namespace.get("build")
    if not callable(build):
        raise AuditError(f"{file.name} must define a function build(data) returning a pymc.Model")
    mapping = namespace.get("MAPPING")
    if not isinstance(mapping, Mapping):
        raise AuditError(
            f"{file.name} must define MAPPING, a dict from the harness's row names "
            "(e.g. '(Intercept)', 'sigma', 'group: sd(tx)', 'group: tx') to the model's quantities"
        )
    return UserModel(build=build, mapping=dict(mapping), source=source, path=str(file))
