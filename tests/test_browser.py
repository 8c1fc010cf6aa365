"""Open generated reports in headless Chromium and check what a reader would see.

Chromium is driven through the DevTools protocol over a pipe
(``--remote-debugging-pipe``), so no Python package beyond the standard
library and no downloaded browser is needed: Debian's ``chromium``
(installed by ``r_scripts/install_r.sh --with-browser``) is enough.  Without
a browser the tests are skipped with the reason.

Each page must: decode every image (naturalWidth > 0), request nothing but
itself (no http(s), no other file, data: URIs only), and show the verdict
table on the first screen.  A screenshot goes to the test's temp folder.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.pipeline.runner import fit_design
from harness.pipeline.settings import FitSettings
from harness.report.page import render_figures

pytestmark = [pytest.mark.browser, pytest.mark.r, pytest.mark.sampling]

#: The default test run's one small fit (shared with test_report/test_plots/test_runner
#: through the runner's disk cache in the session's temp folder).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def find_browser() -> str | None:
    """Chromium from $HARNESS_CHROMIUM, /usr/bin/chromium or the PATH."""
    override = os.environ.get("HARNESS_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class Chromium:
    """A headless Chromium spoken to over the DevTools pipe (fd 3: commands, fd 4: replies)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_pipes() -> None:  # in the child: the protocol wants exactly fds 3 and 4
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=wire_pipes,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        # Cleanup of the driver, not a check: a browser that already exited is fine.
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)


PAGE_CHECK = """
(async () => {
  const images = [...document.images];
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  const table = document.getElementById(%(table)s);
  let tableBox = null;
  if (table) {
    const r = table.getBoundingClientRect();
    const s = getComputedStyle(table);
    tableBox = {top: r.top, height: r.height, width: r.width, display: s.display,
                visibility: s.visibility, rows: table.querySelectorAll("tbody tr").length};
  }
  return JSON.stringify({
    images: images.map(i => ({src: i.src.slice(0, 40), complete: i.complete,
                              width: i.naturalWidth, height: i.naturalHeight, alt: i.alt})),
    resources: performance.getEntriesByType("resource").map(e => e.name),
    table: tableBox, viewport: window.innerHeight,
    height: document.documentElement.scrollHeight, title: document.title,
  });
})()
"""


def inspect_page(browser_path: str, page: Path, table_id: str, shots: Path) -> dict[str, Any]:
    """Load ``page`` in a fresh Chromium; return what it requested, decoded and showed."""
    browser = Chromium(browser_path, shots / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        url = page.resolve().as_uri()
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        result = browser.send(
            "Runtime.evaluate",
            {
                "expression": PAGE_CHECK % {"table": json.dumps(table_id)},
                "awaitPromise": True,
                "returnByValue": True,
            },
            session=session,
        )
        state = json.loads(result["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (shots / f"{page.stem}.png").write_bytes(base64.b64decode(shot["data"]))
        full = browser.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": 1280,
                    "height": min(state["height"], 16000),
                    "scale": 1,
                },
            },
            session=session,
        )
        (shots / f"{page.stem}-full.png").write_bytes(base64.b64decode(full["data"]))
        requests = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
        state.update(url=url, requests=requests, failed=failed)
        return state
    finally:
        browser.close()


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = find_browser()
    if path is None:
        pytest.skip(
            "Chromium not found (install it with `bash r_scripts/install_r.sh --with-browser` "
            "or `apt-get install chromium`, or set HARNESS_CHROMIUM)"
        )
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"Chromium at {path} does not start: {err}")
    return path


@pytest.fixture(scope="module")
def report_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from harness.report.page import write_index, write_report

    result = fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=tmp_path_factory.getbasetemp() / "harness-cache",
        settings=REPORT_SETTINGS,
        render=render_figures,
    )
    folder = tmp_path_factory.mktemp("browser-reports")
    return {
        "report": write_report(result, folder / "sleepstudy.html"),
        "index": write_index([result], folder / "index.html"),
    }


def _assert_offline_and_decoded(state: dict[str, Any]) -> None:
    outside = [u for u in state["requests"] if not u.startswith("data:") and u != state["url"]]
    assert outside == [], f"the page requested {outside}"
    assert [u for u in state["resources"] if not u.startswith("data:")] == []
    assert state["failed"] == [], f"failed loads: {state['failed']}"
    broken = [i for i in state["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == [], f"images that did not decode: {broken}"


def test_report_in_chromium(
    browser_path: str, report_pair: dict[str, Path], tmp_path: Path
) -> None:
    state = inspect_page(browser_path, report_pair["report"], "verdict-table", tmp_path)
    _assert_offline_and_decoded(state)
    assert len(state["images"]) >= 10  # forest, random effects, variance, Z, equations, ...
    table = state["table"]
    assert table is not None, "no verdict table in the page"
    assert table["display"] != "none" and table["visibility"] == "visible"
    assert table["height"] > 0 and table["width"] > 0 and table["rows"] >= 4
    assert table["top"] < state["viewport"], "the verdict table is not on the first screen"
    assert (tmp_path / f"{report_pair['report'].stem}.png").stat().st_size > 10_000


def test_shipped_count_design_shows_its_rootogram_in_chromium(
    browser_path: str, grouseticks_result: Any, tmp_path: Path
) -> None:
    """The shipped negative binomial design (issue 23): same model, its rootogram decodes."""
    from harness.report.page import write_report

    result = grouseticks_result  # shared with tests/test_negbin.py (tests/conftest.py)
    assert result.same_model is not None and result.same_model.ok
    assert abs(result.same_model.difference) < 1e-6  # glmer's logLik at glmer.nb's theta
    page = write_report(result, tmp_path / "grouseticks.html")
    state = inspect_page(browser_path, page, "verdict-table", tmp_path)
    _assert_offline_and_decoded(state)
    rootograms = [i for i in state["images"] if "rootogram" in i["alt"].lower()]
    assert len(rootograms) == 1 and rootograms[0]["width"] > 400


def test_index_in_chromium(browser_path: str, report_pair: dict[str, Path], tmp_path: Path) -> None:
    state = inspect_page(browser_path, report_pair["index"], "index-table", tmp_path)
    _assert_offline_and_decoded(state)
    assert state["table"] is not None and state["table"]["rows"] >= 1
    assert state["table"]["top"] < state["viewport"]


#: The verdict at a glance (issue 24): a reader at 1300 px sees the whole verdict table,
#: each row's picture drawn, without opening anything.
FIRST_SCREEN = {"width": 1300, "height": 900}

GLANCE_CHECK = """
(() => {
  const table = document.getElementById("verdict-table");
  const box = table.getBoundingClientRect();
  const bars = [...table.querySelectorAll("svg.attribution")].map(svg => {
    const r = svg.getBoundingClientRect();
    const steps = [...svg.querySelectorAll("rect.step")].map(s => s.getBoundingClientRect().width);
    return {width: r.width, height: r.height, bottom: r.bottom, steps: steps,
            tolerance: svg.querySelectorAll("rect.tolerance").length,
            pymc: svg.querySelectorAll("line.pymc").length};
  });
  const closed = [...table.querySelectorAll("details")].filter(d => !d.open).length;
  return JSON.stringify({top: box.top, bottom: box.bottom, right: box.right,
    rows: table.querySelectorAll("tbody tr:not(.section)").length, bars: bars, closed: closed,
    legend: !!document.querySelector("svg.attribution-legend"),
    viewport: {width: window.innerWidth, height: window.innerHeight}});
})()
"""


def glance(browser_path: str, page: Path, shots: Path) -> dict[str, Any]:
    """Open ``page`` at the first-screen size; measure the verdict table and its pictures."""
    browser = Chromium(browser_path, shots / "profile-glance")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        browser.send("Page.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {**FIRST_SCREEN, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        result = browser.send(
            "Runtime.evaluate",
            {"expression": GLANCE_CHECK, "returnByValue": True},
            session=session,
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (shots / f"{page.stem}-first-screen.png").write_bytes(base64.b64decode(shot["data"]))
        return json.loads(result["result"]["value"])
    finally:
        browser.close()


def test_the_verdict_table_and_its_pictures_fill_the_first_screen(
    browser_path: str, report_pair: dict[str, Path], tmp_path: Path
) -> None:
    state = glance(browser_path, report_pair["report"], tmp_path)
    assert state["viewport"] == FIRST_SCREEN
    assert state["legend"], "no key to the pictures"
    # Every compared quantity but the same-model row has a split of its gap to draw.
    assert state["rows"] >= 8 and len(state["bars"]) == state["rows"] - 1
    for bar in state["bars"]:
        assert bar["width"] > 100 and bar["height"] > 10
        assert bar["steps"] and all(w > 0 for w in bar["steps"])  # the sources and the rest
        assert bar["tolerance"] == 1 and bar["pymc"] == 1
    # The whole table (up to 10 rows) on the first screen, and no wider than it.
    assert state["bottom"] <= FIRST_SCREEN["height"], state
    assert state["right"] <= FIRST_SCREEN["width"], state
    assert state["closed"] >= state["rows"] - 1  # the sentences wait behind their disclosures
    assert (tmp_path / f"{report_pair['report'].stem}-first-screen.png").stat().st_size > 10_000
