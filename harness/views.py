"""Rich displays of the harness's results (Jupyter's ``_repr_html_``), by registration.

The result types (:class:`~harness.checks.compare.Comparison`,
:class:`~harness.checks.same_model.SameModel`,
:class:`~harness.pipeline.runner.DesignResult`) live in fitting code, which never
imports report code (``tests/test_architecture.py``).  So their ``_repr_html_`` asks
this registry, the report package registers how each type is shown
(:mod:`harness.report.notebook`), and the package's front door
(``harness/__init__.py``) names the module that registers, loaded on the first display.
"""

from __future__ import annotations

import html as _html
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["html", "on_first_use", "register"]

log = logging.getLogger("harness")

_VIEWS: dict[type, Callable[[Any], str]] = {}
_LOADERS: list[Callable[[], None]] = []


def register(kind: type, view: Callable[[Any], str]) -> None:
    """Show objects of ``kind`` (and its subclasses) as ``view(obj)`` (HTML text)."""
    _VIEWS[kind] = view


def on_first_use(loader: Callable[[], None]) -> None:
    """Call ``loader`` (which registers views) before the first display."""
    _LOADERS.append(loader)


def html(obj: Any) -> str | None:
    """The registered HTML view of ``obj``; None when there is none (plain ``repr`` then).

    A view that fails is no lost result: the snippet says what went wrong, above the
    plain ``repr``.
    """
    while _LOADERS:
        loader = _LOADERS.pop(0)
        try:
            loader()
        except Exception as err:  # without the report package the plain repr still shows
            log.warning("no HTML views: %s: %s", type(err).__name__, err)
    view = next((_VIEWS[k] for k in type(obj).__mro__ if k in _VIEWS), None)
    if view is None:
        return None
    try:
        return view(obj)
    except Exception as err:  # any failure of the view becomes its note
        log.warning("HTML view of %s failed: %s: %s", type(obj).__name__, type(err).__name__, err)
        return (
            f"<div><p><em>The table could not be shown: {_html.escape(str(err))} "
            f"({type(err).__name__}).</em></p><pre>{_html.escape(repr(obj))}</pre></div>"
        )
