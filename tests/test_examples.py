"""The worked examples run: one notebook executes top to bottom in a fresh kernel.

``examples/run.py`` (what ``nox -s examples`` calls) executes it with nbclient; a
cell that raises fails the test.  Small draws and one sampler run keep it short; the
executed notebook must show the verdict table with its pictures and draw its figures.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.r, pytest.mark.sampling]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _runner():
    spec = importlib.util.spec_from_file_location("examples_run", EXAMPLES / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_listed_and_valid() -> None:
    nbformat = pytest.importorskip("nbformat")
    found = {p.stem for p in _runner().notebooks()}
    assert {"sleepstudy", "cafe", "partially_clustered"} <= found
    for path in EXAMPLES.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        # Shipped clean: outputs come from running them, never from the repository.
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path


def test_the_sleepstudy_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name, value in {
        "HARNESS_DRAWS": "200",
        "HARNESS_TUNE": "200",
        "HARNESS_CHAINS": "2",
        "HARNESS_MAX_ROUNDS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    written = _runner().execute(EXAMPLES / "sleepstudy.ipynb", tmp_path, timeout=600, html=False)
    cells = json.loads(written.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    html = ["".join(o["data"]["text/html"]) for o in outputs if "text/html" in o.get("data", {})]
    assert any('<svg class="attribution"' in h for h in html), "no verdict table with pictures"
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2, "the predictive check and the new subject were not drawn"
