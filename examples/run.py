"""Execute the worked examples (``examples/*.ipynb``) and render each to HTML.

``python examples/run.py [NAME ...] [--out-dir DIR] [--timeout S]``: runs each notebook
top to bottom in a fresh kernel (nbclient), writes the executed notebook and an HTML
rendering (nbconvert) to ``DIR`` (default ``reports/examples``), and stops at the first
cell that raises.  ``nox -s examples`` calls it; ``HARNESS_DRAWS``/``TUNE``/``CHAINS``/
``MAX_ROUNDS`` set the sampler's budget inside the notebooks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The example notebooks, all or those named (without ``.ipynb``)."""
    found = sorted(HERE.glob("*.ipynb"))
    if not names:
        return found
    by_name = {p.stem: p for p in found}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown example(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


def execute(path: Path, out_dir: Path, timeout: int = 1200, html: bool = True) -> Path:
    """Run ``path`` in a fresh kernel (working directory: the repository root); write the
    executed notebook, and its HTML when ``html``, to ``out_dir``.  Returns the notebook
    written.  A cell that raises stops the run (``nbclient`` raises ``CellExecutionError``).
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = out_dir / path.name
    nbformat.write(notebook, written)
    if html:
        (out_dir / f"{path.stem}.html").write_text(render_html(notebook), encoding="utf-8")
    return written


#: nbconvert's lab page without the scripts it fetches from a CDN (RequireJS, MathJax,
#: Mermaid): like the reports, the pages read offline (the examples typeset no math).
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def render_html(notebook: Any) -> str:
    """An executed notebook as one HTML page that loads nothing from elsewhere."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        extra_loaders=[jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
        template_file="offline.html.j2",
    )
    body, _ = exporter.from_notebook_node(notebook)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports" / "examples")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in notebooks(args.names):
        print(f"{path.name}: running", file=sys.stderr, flush=True)
        written = execute(path, args.out_dir, args.timeout)
        print(f"{path.name}: done -> {written.with_suffix('.html')}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
