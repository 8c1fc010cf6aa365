"""The fit cache cannot lie or run code: JSON entries checked against their keys.

Each hostile case of issue 11 (points 5 and 6) has a test here: a pickle in the
cache is never loaded, an entry of another data set is refitted, damaged or
wrongly shaped entries are reported and refitted, a read-only cache still gives
the report, and temp files of killed writers are removed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal, assert_series_equal

import harness.pipeline.cache as cache_mod
from harness._io import host_tag
from harness.engines.registry import get_engine
from harness.pipeline.cache import FitCache, clean_stale_temp_files, decode, encode
from harness.pipeline.runner import fit_design
from harness.pipeline.settings import FitSettings
from harness.report.page import render_figures

ROOT = Path(__file__).resolve().parents[1]
#: Few draws: these tests are about the cache, not about the fits.
TINY = FitSettings(draws=50, tune=50, chains=2, n_sims=50, profile=False, max_rounds=1)
#: The default test run's one small fit, shared through the session's disk cache
#: (tests/test_runner.py and tests/test_report.py fit it with the same settings).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)


def _round_trip(value: Any, context: dict[str, Any] | None = None) -> Any:
    """Through the codec and JSON text, as an entry goes to disk and back."""
    text = json.dumps(encode(value, context))
    return decode(json.loads(text), context)


def assert_same(a: Any, b: Any, where: str = "value") -> None:
    """Deep equality that compares tables with pandas.testing and NaN equal to NaN."""
    if isinstance(a, pd.DataFrame):
        assert isinstance(b, pd.DataFrame), where
        assert_frame_equal(a, b, check_exact=True, obj=where)
        assert a.attrs == b.attrs, where
    elif isinstance(a, pd.Series):
        assert_series_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- the codec


def test_tables_round_trip_with_their_dtypes() -> None:
    frame = pd.DataFrame(
        {
            "term": pd.Series(["(Intercept)", "Days", None], dtype="str"),
            "estimate": [1.0 / 3.0, np.nan, -np.inf],
            "n": np.array([1, 2, 3], dtype=np.int64),
            "ok": [True, False, True],
            "kind": pd.Categorical(["sd", "cor", "sd"], categories=["sd", "cor", "sigma"]),
            "count": pd.array([1, None, 3], dtype="Int64"),
            # Object columns hold dicts and lists (the attribution of a comparison row).
            "attribution": [{"prior": 0.5, "sampling": [1, 2]}, None, {"$odd": "key"}],
            "explanation": ["lme4's interval is Wald", np.nan, ""],
            "label": pd.Series(["a", pd.NA, None], dtype=object),  # object stays object
            "when": pd.to_datetime(["2026-01-01", "2026-06-30", "2026-12-31"]),
        }
    )
    frame.attrs["source"] = "test"
    back = _round_trip(frame)
    assert_same(frame, back)
    assert back["attribution"][0] == {"prior": 0.5, "sampling": [1, 2]}
    indexed = frame.set_index("term")
    assert_same(indexed, _round_trip(indexed))
    empty = frame.iloc[0:0]
    assert_same(empty, _round_trip(empty))


def test_nested_values_round_trip() -> None:
    from harness.model.priors import ResolvedPriors
    from harness.model.spec import ModelSpec, Prior

    spec = ModelSpec("y ~ x + (x | g)", priors={"sigma": Prior("HalfNormal", {"sigma": 2.0})})
    priors = ResolvedPriors(
        fixed={"(Intercept)": Prior("Normal", {"mu": 0.0, "sigma": 10.0})},
        sd={("g", "x"): Prior("HalfNormal", {"sigma": 1.5})},
        sigma=Prior("Exponential", {"lam": 1.0}),
        notes=["a note"],
    )
    value = {
        "spec": spec,
        "priors": priors,
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "labels": np.array(["a", "bc"]),
        "objects": np.array([{"a": 1}, None], dtype=object),
        "tuple": (1, "two", 3.0, None, True),
        "int_keys": {1: "one", (2, "b"): [np.float64(2.5)]},
        "series": pd.Series([1.5, 2.5], index=pd.Index(["a", "b"], name="k"), name="s"),
        "rounds": [{"draws": 1000, "ess_bulk": 320.5, "reason": None}],  # BayesFit.settings-like
    }
    back = _round_trip(value)
    assert_same({**value, "int_keys": {1: "one", (2, "b"): [2.5]}}, back)


def test_unknown_values_are_refused_on_write_and_read() -> None:
    with pytest.raises(TypeError, match="cannot cache"):
        encode({"f": object()})
    with pytest.raises(TypeError, match="cannot cache"):
        encode(dataclasses.make_dataclass("FreqFit", ["a"])(1))  # same name, other class
    for doc in (
        {"$dataclass": "Popen", "fields": {"args": ["touch", "/tmp/x"]}},
        {"$dataclass": "subprocess.Popen", "fields": {}},
        {"$pickle": "gASVAAAA"},
        {"$array": {"dtype": "O", "shape": [1], "data": "AAAA"}},
        {"$ref": "design"},  # the caller supplied no design
        {"$dataclass": "ModelSpec", "fields": {"formula": "y ~ x"}},  # fields missing
    ):
        with pytest.raises(cache_mod.CacheEntryError):
            decode(doc)
    # A field of the wrong type (a table where a float belongs) is a wrong shape too.
    spec_doc = encode(__import__("harness.model.spec", fromlist=["ModelSpec"]).ModelSpec("y ~ x"))
    spec_doc["fields"]["reml"] = "yes"
    with pytest.raises(cache_mod.CacheEntryError, match="reml"):
        decode(spec_doc)


# --------------------------------------------------------------------------- files on disk


def _parts(n: int = 1) -> dict[str, Any]:
    return {"format": cache_mod.CACHE_FORMAT, "kind": "compare", "n": n}


def test_entries_are_checked_against_their_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FitCache(tmp_path)
    parts, other = _parts(1), _parts(2)
    key, other_key = cache_mod.digest(parts), cache_mod.digest(other)
    assert store.store("compare", key, {"x": 1.5}, parts)
    assert store.load("compare", key, parts, shape=dict) == ({"x": 1.5}, {})
    # Another entry copied over this one.
    assert store.store("compare", other_key, {"x": 2.5}, other)
    shutil.copy(store.path("compare", other_key, ".json"), store.path("compare", key, ".json"))
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert store.load("compare", key, parts, shape=dict) is None
    assert str(store.path("compare", key, ".json")) in caplog.text
    # ... with its key field edited to match: its parts no longer hash to it.
    doc = json.loads(store.path("compare", key, ".json").read_text())
    doc["key"] = key
    store.path("compare", key, ".json").write_text(json.dumps(doc))
    assert store.load("compare", key, parts, shape=dict) is None
    assert "do not hash to its key" in caplog.text
    # Valid JSON of the wrong shape, garbage, and an empty file.
    assert store.store("compare", key, "a string", parts)
    assert store.load("compare", key, parts, shape=dict) is None
    for junk in (b"{not json", b"", b"[1, 2, 3]", b'{"format": "harness-fit-cache"}'):
        store.path("compare", key, ".json").write_bytes(junk)
        assert store.load("compare", key, parts, shape=dict) is None
    # A pointer file that tries to leave the cache folder.
    (tmp_path / "lme4").mkdir()
    (tmp_path / "lme4" / "latest-abc.txt").write_text("../../etc/passwd")
    assert store.latest_for("lme4", "abc") is None


def test_side_files_are_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FitCache(tmp_path)
    parts = {**_parts(), "kind": "pymc"}
    key = cache_mod.digest(parts)
    assert store.store(
        "pymc", key, [1, 2], parts, files={".nc": lambda tmp: tmp.write_bytes(b"draws" * 100)}
    )
    assert store.load("pymc", key, parts, files=(".nc",)) == ([1, 2], {})
    nc = store.path("pymc", key, ".nc")
    nc.write_bytes(nc.read_bytes()[:50])  # truncated
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert store.load("pymc", key, parts, files=(".nc",)) is None
    assert f"{key}.nc is not the file this entry wrote" in caplog.text
    nc.unlink()
    assert store.load("pymc", key, parts, files=(".nc",)) is None


def test_a_pickle_in_the_cache_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    store = FitCache(tmp_path / "c")
    parts = _parts()
    key = cache_mod.digest(parts)
    folder = tmp_path / "c" / "compare"
    folder.mkdir(parents=True)
    (folder / f"{key}.pkl").write_bytes(payload)  # the old layout's entry
    assert store.load("compare", key, parts) is None
    (folder / f"{key}.json").write_bytes(payload)  # a pickle where the JSON belongs
    assert store.load("compare", key, parts) is None
    assert not marker.exists()


def test_read_only_cache_logs_and_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    parts = _parts()
    key = cache_mod.digest(parts)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert not FitCache(blocker / "cache").store("compare", key, {"x": 1}, parts)
    assert "could not write the cache entry" in caplog.text

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod.os, "replace", read_only)
    store = FitCache(tmp_path / "ro")
    nc = {".nc": lambda tmp: tmp.write_bytes(b"x")}
    assert not store.store("compare", key, {"x": 1}, parts, files=nc)
    assert "Read-only file system" in caplog.text
    leftovers = [p for p in (tmp_path / "ro").rglob("*") if p.is_file()]
    assert leftovers == []  # no temp file left behind


# --------------------------------------------------------------------------- stale temp files


def test_stale_temp_files_are_removed_when_the_cache_opens(tmp_path: Path) -> None:
    folder = tmp_path / "pymc"
    folder.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = host_tag()
    name = "0123456789abcdef01234567.nc"
    of_dead = folder / f".{name}.{host}-{dead_pid}.abc123.tmp"
    of_live = folder / f".{name}.{host}-{os.getpid()}.def456.tmp"
    old_live = folder / f".{name}.{host}-{os.getpid()}.ghi789.tmp"
    other_host_recent = folder / f".{name}.ffffffff-{dead_pid}.jkl000.tmp"
    unrelated = folder / ".someone-elses.tmp"
    outside = tmp_path / f".{name}.{host}-{dead_pid}.abc123.tmp"  # not in a kind folder
    for path in (of_dead, of_live, old_live, other_host_recent, unrelated, outside):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old_live, (two_hours_ago, two_hours_ago))
    if cache_mod._pid_alive(dead_pid):  # pid reused already: nothing to test with it
        pytest.skip("the finished process's pid was reused")
    FitCache(tmp_path)
    assert not of_dead.exists() and not old_live.exists()
    assert of_live.exists() and other_host_recent.exists()
    assert unrelated.exists() and outside.exists()
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_a_writer_killed_mid_write_leaves_nothing_for_long(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from harness._io import write_via_temp as atomic_write
        def slow(tmp):
            tmp.write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write(Path({str(tmp_path / "lme4" / "0123456789abcdef01234567.json")!r}), slow)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = list((tmp_path / "lme4").glob(".*.tmp"))
    assert len(left) == 1  # what SIGKILL leaves
    FitCache(tmp_path)
    assert list((tmp_path / "lme4").iterdir()) == []


def test_default_cache_is_the_users_cache_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import platformdirs

    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    default = cache_mod.resolve_cache_dir()
    assert default == Path(platformdirs.user_cache_dir("harness", appauthor=False))
    assert tmp_path not in default.parents
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "env"))
    assert cache_mod.resolve_cache_dir() == tmp_path / "env"


# --------------------------------------------------------------------------- through the runner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A complete cache of sleepstudy (both engines, comparison, same-model, figures).

    The session's shared cache: warm when other modules have fitted it already.
    """
    path = tmp_path_factory.getbasetemp() / "harness-cache"
    return path, fit_design(
        "sleepstudy", seed=1, cache_dir=path, settings=REPORT_SETTINGS, render=render_figures
    )


def _copy(tiny: tuple[Path, Any], tmp_path: Path) -> Path:
    target = tmp_path / "cache"
    shutil.copytree(tiny[0], target)
    return target


def _entry(cache: Path, kind: str, result: Any) -> Path:
    """The file of one of ``result``'s cache entries."""
    return cache / kind / f"{result.keys[kind]}.json"


@pytest.mark.r
@pytest.mark.sampling
def test_every_cached_class_round_trips(tiny: tuple[Path, Any]) -> None:
    path, result = tiny
    freq, bayes, cmp = result.freq, result.bayes_info, result.comparison
    context = {"spec": result.spec, "design": result.design}
    store = FitCache(path)
    for kind, obj, ctx in (
        ("lme4", freq, context),
        ("pymc", dataclasses.replace(bayes, idata=None), context),
        ("compare", {"comparison": cmp, "seconds": 1.0}, {"freq": freq, "bayes": bayes}),
        ("same_model", {"result": result.same_model, "status": "ok", "seconds": 1.0}, None),
        ("figures", {"figures": result.figures, "seconds": 1.0}, None),
    ):
        assert_same(obj, _round_trip(obj, ctx), kind)
        # And from the file the run wrote.
        doc = json.loads(_entry(path, kind, result).read_text())
        hit = store.load(kind, doc["key"], doc["parts"], context=ctx)
        assert hit is not None, kind
        stored = hit[0]
        if kind in ("lme4", "pymc"):
            assert_same(obj, stored, kind)
        else:
            assert_same(obj[next(iter(obj))], stored[next(iter(obj))], kind)
    # Without the reference (another caller's fit), the design itself round-trips too.
    assert_same(result.design, _round_trip(result.design), "design")
    assert_same(freq, _round_trip(freq), "lme4 without context")
    # Fits are stored by reference to the runner's spec and design, not copied.
    text = _entry(path, "lme4", result).read_text()
    assert '{"$ref": "design"}' in text and "Reaction" in text
    assert len(text) < 2_000_000


@pytest.mark.r
@pytest.mark.sampling
def test_pickles_and_damaged_entries_are_refitted(
    tiny: tuple[Path, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _copy(tiny, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    for entry in cache.glob("*/*.json"):
        entry.with_suffix(".pkl").write_bytes(payload)
    _entry(cache, "lme4", tiny[1]).write_bytes(payload)  # a pickle in place of the entry
    _entry(cache, "compare", tiny[1]).write_text(
        '{"format": "harness-fit-cache", "value": [}'
    )  # garbage
    nc = cache / "pymc" / f"{tiny[1].keys['pymc']}.nc"
    nc.write_bytes(nc.read_bytes()[: nc.stat().st_size // 2])  # truncated draws
    same = _entry(cache, "same_model", tiny[1])
    doc = json.loads(same.read_text())
    doc["value"] = {"result": "ok", "status": "ok", "seconds": 1.0}  # valid JSON, wrong shape
    same.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="harness"):
        result = fit_design(
            "sleepstudy", seed=1, cache_dir=cache, settings=REPORT_SETTINGS, render=render_figures
        )
    assert not marker.exists()
    assert not result.cached["lme4"] and not result.cached["pymc"]
    assert not result.cached["compare"] and not result.cached["same_model"]
    for kind in ("lme4", "compare", "same_model"):
        assert str(_entry(cache, kind, tiny[1])) in caplog.text, kind
    assert nc.name in caplog.text
    assert result.bayes.idata.posterior.sizes["draw"] == REPORT_SETTINGS.draws
    # The refits overwrote the damage: the next run is served from the cache, quietly.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness"):
        again = fit_design(
            "sleepstudy", seed=1, cache_dir=cache, settings=REPORT_SETTINGS, render=render_figures
        )
    assert all(again.cached.values()), again.cached
    assert "ignoring cache entry" not in caplog.text
    assert again.bayes.idata.posterior.sizes["draw"] == REPORT_SETTINGS.draws
    assert not marker.exists()


@pytest.mark.r
def test_an_entry_of_other_data_is_refitted(
    sleepstudy: tuple[pd.DataFrame, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An lme4 entry of another data set with the same formula, copied over, is not used."""
    from harness.model.spec import build_design
    from harness.pipeline import runner

    data, spec = sleepstudy
    other = data.copy()
    other["Reaction"] = other["Reaction"] * 2.0 + 50.0
    store = FitCache(tmp_path)
    lme4 = get_engine("lme4")

    def stage(store: FitCache, design: Any, spec: Any, data: Any, settings: Any, refit: bool):
        return runner._fit_engine_cached(store, lme4, design, spec, data, settings, 1, refit)

    d_other = build_design(spec, other)
    fit_other, key_other, _, _ = stage(store, d_other, spec, other, TINY, False)
    design = build_design(spec, data)
    key = runner.engine_key(lme4, design, spec, TINY, 1).key
    assert key != key_other
    shutil.copy(store.path("lme4", key_other, ".json"), store.path("lme4", key, ".json"))
    with caplog.at_level(logging.WARNING, logger="harness"):
        fit, got_key, cached, _ = stage(store, design, spec, data, TINY, False)
    assert got_key == key and not cached
    assert str(store.path("lme4", key, ".json")) in caplog.text
    assert fit.fixed["estimate"].iloc[0] == pytest.approx(251.405, abs=1e-3)
    assert fit_other.fixed["estimate"].iloc[0] != pytest.approx(251.405, abs=1)
    # Overwritten with the right fit: served from the cache now.
    again, _, cached, _ = stage(store, design, spec, data, TINY, False)
    assert cached and again.design is design
    assert_frame_equal(again.fixed, fit.fixed)


@pytest.mark.r
@pytest.mark.sampling
def test_read_only_cache_still_writes_the_report(
    tiny: tuple[Path, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache folder that cannot be created (its parent is a file): a warning, and the report."""
    from harness.report.page import write_report

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="harness"):
        result = fit_design(
            "sleepstudy", seed=1, cache_dir=blocker / "cache", settings=TINY, render=render_figures
        )
        out = write_report(result, tmp_path / "report.html")
    assert not any(result.cached.values())
    assert Path(out).stat().st_size > 10_000
    assert "could not write the cache entry" in caplog.text
    assert str(blocker / "cache") in caplog.text


@pytest.mark.r
def test_write_errors_while_storing_keep_the_fit(
    sleepstudy: tuple[pd.DataFrame, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from harness.model.spec import build_design
    from harness.pipeline import runner

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod.os, "replace", read_only)
    data, spec = sleepstudy
    store = FitCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="harness"):
        fit, _, cached, _ = runner._fit_engine_cached(
            store, get_engine("lme4"), build_design(spec, data), spec, data, TINY, 1, False
        )
    assert not cached and fit.fixed.shape[0] == 2
    assert "Read-only file system" in caplog.text
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
