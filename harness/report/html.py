"""HTML helpers shared by every page the harness writes (design, index, study, gallery).

Number formatting, the Jinja2 environment of ``harness/report/templates``,
inline images (figures as data URIs: pages stay self-contained and work
offline) and atomic writes of the finished page.
"""

from __future__ import annotations

import base64
import gc
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness._io import atomic_write_text

if TYPE_CHECKING:
    import jinja2
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

__all__ = [
    "TEMPLATES",
    "cell",
    "defined_text",
    "figure_to_data_uri",
    "fmt",
    "heap_frozen",
    "render_page",
    "template_env",
    "write_html",
]

log = logging.getLogger("harness")

TEMPLATES = Path(__file__).resolve().parent / "templates"


def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; dashes for missing values."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "—"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if number != 0 and abs(number) < 1e-3:
        return f"{number:.{max(digits - 1, 1)}e}"
    if abs(number) >= 10**digits:
        return f"{number:.0f}"
    return f"{number:.{digits}g}"


#: A NaN that an f-string formatted into a sentence: ``nan``, ``+nan``, ``-nan``.
_NAN_WORD = re.compile(r"(?<![\w.])[+-]?nan(?!\w)")


def defined_text(text: Any, what: str = "") -> str:
    """Text for a page with no ``nan`` in it: a NaN written into a sentence reads "undefined".

    Explanations and notes are sentences built in several modules; a number
    that is undefined (a correlation of an SD at 0, a ratio to a zero MCSE)
    must say so there.  Where one slips through it would print ``nan``, which
    tells a reader nothing: it is written "undefined" and logged, naming the
    text, so that the sentence's author can say why instead.

    Parameters
    ----------
    text : any
        A sentence; None or a NaN float gives "".
    what : str
        Where the text comes from, for the log.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    out = str(text)
    if _NAN_WORD.search(out):
        log.warning(
            "an undefined number in the report's text%s: %r", f" ({what})" if what else "", out
        )
        out = _NAN_WORD.sub("undefined", out)
    return out


def cell(value: Any) -> str:
    """A text cell of a table: a dash for a missing value, never ``nan``."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "—"
    return defined_text(value)


@cache
def template_env() -> jinja2.Environment:
    """The Jinja2 environment of the harness templates (autoescaped HTML, strict undefined)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["text"] = cell
    env.filters["sentence"] = defined_text
    return env


def render_page(template: str, context: Mapping[str, Any]) -> str:
    """Render one template of ``harness/report/templates`` with ``context``."""
    return template_env().get_template(template).render(**context)


def write_html(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A failure at any point leaves the previous file (if any) untouched and
    removes the temporary file; a path that exists and is not a regular file
    (a FIFO, device node, symbolic link) is refused (:mod:`harness._io`).
    """
    return atomic_write_text(path, text)


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Keep the garbage collector's full collections off the objects that exist on entry.

    Drawing creates (and, figure by figure, frees) many short-lived matplotlib
    objects, which sets off full collections, and each full collection walks
    every object the process holds: the fits, the draws, the data, all there
    before the first figure.  That cost 0.2-0.4 s per report.  Inside this
    block those objects sit in the permanent generation (:func:`gc.freeze`),
    so collections scan only what the drawing made; on exit they go back.
    Nothing changes when someone else has frozen objects already.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: White margin (inches) around a figure's contents.
PAD_INCHES = 0.08


def _lay_out(fig: Figure, dpi: int) -> Bbox | str:
    """Lay a figure out once at the output dpi and return the box to save (inches).

    ``savefig(bbox_inches="tight")`` on a figure with a layout engine
    (constrained layout) walks every artist three times before the pass that
    renders: a drawing pass with rendering switched off, only to run the
    layout, then one to measure the tight box.  Here the layout runs on its
    own and the box comes from the layout (:func:`_laid_out_box`), so
    ``savefig`` gets that box and no layout engine and renders in a single
    pass: the same picture, cropped the same to within a pixel.  A layout that
    warns (Axes collapsed to nothing) and other engines get the box measured;
    a figure without a layout engine (the equations) gets ``"tight"``.
    """
    engine = fig.get_layout_engine()
    if engine is None:
        return "tight"
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.execute(fig)
    for warning in caught:  # pass on what the layout had to say
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    # Remove the engine outright: "none" would leave a placeholder engine, for which
    # savefig still makes its layout pass.  (None means "none" unless the rc
    # parameters ask for a default layout, hence the context.)
    with mpl.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)
    renderer = canvas.get_renderer()
    visible = [ax for ax in fig.axes if ax.get_visible()]
    if caught or not isinstance(engine, ConstrainedLayoutEngine) or not visible:
        return fig.get_tightbbox(renderer).padded(PAD_INCHES)
    return _laid_out_box(fig, visible, engine, renderer).padded(PAD_INCHES)


def _laid_out_box(fig: Figure, axes: list[Any], engine: Any, renderer: Any) -> Bbox:
    """The tight box (inches) of a figure the constrained layout has just laid out.

    The layout puts every Axes with its decorations inside the figure, its pad
    away from each edge; on a side where a figure-level artist sits beyond the
    Axes (the legend at the foot, the suptitle, a supylabel) that artist is the
    edge instead, and such an artist may also stick out sideways (a legend
    wider than the figure).  So the box is known from a handful of extents,
    without walking every tick label once more (a tenth of the drawing time);
    it can be a pixel or two looser than the tight box, where an Axes's
    decorations stop short of the pad (a colorbar's).
    """
    from matplotlib.transforms import Bbox

    to_inches = fig.dpi_scale_trans.inverted()
    w_pad, h_pad = engine.get()["w_pad"], engine.get()["h_pad"]
    x0, y0 = w_pad, h_pad
    x1, y1 = fig.get_figwidth() - w_pad, fig.get_figheight() - h_pad
    area = Bbox.union([ax.get_position() for ax in axes]).transformed(fig.transFigure + to_inches)
    extents = [  # fig.texts holds the suptitle and the sup-labels too
        artist.get_window_extent(renderer).transformed(to_inches)
        for artist in [*fig.legends, *fig.texts]
        if artist.get_visible() and artist.get_in_layout()
    ]
    below = [e.y0 for e in extents if e.y1 <= area.y0]
    above = [e.y1 for e in extents if e.y0 >= area.y1]
    left = [e.x0 for e in extents if e.x1 <= area.x0]
    right = [e.x1 for e in extents if e.x0 >= area.x1]
    box = Bbox.from_extents(
        min(left) if left else x0,
        min(below) if below else y0,
        max(right) if right else x1,
        max(above) if above else y1,
    )
    return Bbox.union([box, *extents])


def _write_opaque_png(fig: Figure, box: Bbox, dpi: int, buffer: io.BytesIO) -> bool:
    """Write ``fig`` cropped to ``box`` as an RGB PNG; False (nothing written) if it is not opaque.

    A figure on white has no transparent pixel, so its alpha channel is a
    quarter of the data for nothing: dropping it makes the PNG a tenth
    smaller and quicker to compress, with the same pixels.
    """
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="rgba", dpi=dpi, bbox_inches=box, facecolor="white")
    width, height = int(box.width * dpi), int(box.height * dpi)  # as the Agg renderer sizes it
    pixels = raw.getvalue()
    if len(pixels) != width * height * 4:
        return False
    rgba = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 4)
    if not np.all(rgba[..., 3] == 255):
        return False
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(buffer, format="png", dpi=(dpi, dpi))
    return True


def figure_to_data_uri(fig: Figure, fmt_: str = "png", dpi: int = 110) -> dict[str, Any]:
    """Render a Figure to an inline image: ``{"uri", "width", "height"}`` (CSS pixels).

    The image is cropped to the figure's contents with a small margin; a
    figure with a layout engine is laid out and measured once first
    (:func:`_lay_out`).
    """
    box = _lay_out(fig, dpi)
    buffer = io.BytesIO()
    if not (
        fmt_ == "png" and not isinstance(box, str) and _write_opaque_png(fig, box, dpi, buffer)
    ):
        fig.savefig(
            buffer,
            format=fmt_,
            dpi=dpi,
            bbox_inches=box,
            pad_inches=PAD_INCHES,
            facecolor="white",
            metadata={"Software": None} if fmt_ == "png" else {"Date": None},
        )
    payload = buffer.getvalue()
    width, height = fig.get_size_inches() * 100  # CSS size: 100 px per inch of figure
    # The true size after bbox_inches="tight": from the PNG header, or the SVG's pt size.
    if fmt_ == "png":
        px_w, px_h = int.from_bytes(payload[16:20], "big"), int.from_bytes(payload[20:24], "big")
        width, height = px_w * 100 / dpi, px_h * 100 / dpi
    else:
        head = payload[:2000].decode("utf-8", "replace")
        found = re.search(r'width="([\d.]+)pt"\s+height="([\d.]+)pt"', head)
        if found:
            width, height = float(found[1]) * 100 / 72, float(found[2]) * 100 / 72
    mime = "image/png" if fmt_ == "png" else "image/svg+xml"
    return {
        "uri": f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}",
        "width": round(width),
        "height": round(height),
    }
