"""Your own data: ``harness compare data.csv --formula ...`` and :func:`compare_data`.

The command reads a CSV, checks it against the formula before anything is
fitted (clear errors naming the file, column or level at fault), fits both
engines through :func:`harness.pipeline.runner.fit_design` (so fits are cached like
the shipped designs'), runs the likelihood-identity check, and writes the
HTML report and, with ``--json``, the comparison tables and the same-model
result as JSON.  Outputs appear all together or not at all: each is written
to a temporary file and renamed only once every stage has succeeded.

Sampler settings default to :class:`harness.pipeline.runner.FitSettings` (4 chains of
1000 draws after 1000 tuning steps).  The environment variables
``HARNESS_DRAWS``, ``HARNESS_TUNE``, ``HARNESS_CHAINS`` and ``HARNESS_MAX_ROUNDS``
(rounds of adaptive sampling) override them, for quick looks and for the test
suite; ``--max-rounds``, ``--max-draws``, ``--max-seconds`` and ``--no-adaptive``
set the adaptive budget on the command line.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness._io import atomic_write, check_outputs
from harness.engines.registry import get_engine
from harness.model.spec import ModelSpec, build_design

if TYPE_CHECKING:
    import argparse

    from harness.pipeline.runner import DesignResult
    from harness.pipeline.settings import FitSettings

log = logging.getLogger("harness")

#: Environment variables that override the sampler settings (name -> FitSettings field).

JSON_FORMAT = "harness.compare/1"


# --------------------------------------------------------------------------- reading


def read_data(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a comma-separated file with a header row.

    Missing values are empty cells or ``NA`` (as R's ``read.csv`` reads them;
    pandas also takes ``NaN``, ``null``, ``N/A``).  Text columns become factors
    later, with R's level order.

    Raises
    ------
    ValueError
        When the file is missing, not a file, unreadable, not UTF-8 text,
        empty, has a header but no rows, or cannot be parsed as CSV.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file '{path}' does not exist")
    if path.is_dir():
        raise ValueError(f"data file '{path}' is a directory, not a CSV file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read data file '{path}': {err.strerror or err}") from None
    if not raw.strip():
        raise ValueError(f"data file '{path}' is empty")
    if b"\x00" in raw[:4096]:
        raise ValueError(f"data file '{path}' is not text (it contains NUL bytes); save it as CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8 CSV"
        ) from None
    # pandas renames a repeated header ("x", "x" -> "x", "x.1"): refuse it instead.
    header = next(csv.reader(io.StringIO(text)), [])
    repeated = sorted({h for h in header if h.strip() and header.count(h) > 1})
    if repeated:
        raise ValueError(
            f"data file '{path}' has more than one column named {repeated}; "
            "column names must be unique"
        )
    try:
        data = pd.read_csv(path, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"data file '{path}' is empty") from None
    except pd.errors.ParserError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"data file '{path}' is not valid CSV: {first}") from None
    if data.shape[0] == 0:
        raise ValueError(
            f"data file '{path}' has a header ({', '.join(map(str, data.columns))}) but no rows"
        )
    unnamed = [c for c in data.columns if str(c).startswith("Unnamed: ")]
    if unnamed and len(unnamed) == 1 and data.columns[0] == unnamed[0]:
        # R's write.csv with row names leaves an empty first header cell.
        data = data.drop(columns=unnamed)
    if data.shape[1] == 1 and any(sep in str(data.columns[0]) for sep in (";", "\t", "|")):
        raise ValueError(
            f"data file '{path}' has one column {str(data.columns[0])!r}; the harness reads "
            "comma-separated files (is it separated by ';' or tabs?)"
        )
    log.info("read %s: %d rows, %d columns", path, data.shape[0], data.shape[1])
    return data


# --------------------------------------------------------------------------- fitting


def compare_data(
    data: pd.DataFrame,
    formula: str,
    *,
    sigma_by: str | None = None,
    priors: str | Mapping[str, Any] = "weak",
    seed: int = 1,
    name: str | None = None,
    family: str = "gaussian",
    link: str | None = None,
    settings: FitSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    refit: bool = False,
    figures: bool = True,
    side_process: bool = False,
    engines: Sequence[str] | None = None,
) -> DesignResult:
    """Fit your own data with lme4 and PyMC, compare them and run the same-model check.

    Parameters
    ----------
    data : DataFrame
        One row per observation.  Rows with a missing value in a used column
        are dropped (lme4's ``na.omit``) and counted in the notes.
    formula : str
        A gaussian lme4 formula, e.g. ``"y ~ x + (x | g)"``.
    sigma_by : str, optional
        Column with one residual SD per level (nlme stands in for lme4).
    priors : str or mapping
        Prior profile (``"weak"``, ``"m14.1"``, ``"flat"``) or overrides.
    seed : int
        PyMC seed.
    name : str, optional
        Title of the report.
    family, link : str
        Response family (``"gaussian"``, ``"binomial"``, ``"poisson"``) and link.
    settings : FitSettings, optional
        Sampler and lme4 settings; default from :func:`settings_from_env`.
    cache_dir : path, optional
        Fit cache (default ``$HARNESS_CACHE_DIR``, else the user's cache folder).
    refit : bool
        Ignore cached fits.
    figures : bool
        Render the report's figures too.
    side_process : bool
        Fit lme4 in a second process while this one compiles the PyMC model
        (see :func:`harness.pipeline.runner.fit_design`); the command line does.
    engines : sequence of str, optional
        Registered engine names (:mod:`harness.engines.registry`), lme4 among
        them; default ``("lme4", "pymc")``.  An unknown name, or an engine not
        installed here, is refused before any fit.

    Returns
    -------
    DesignResult
        Pass it to :func:`harness.report.page.write_report` or :func:`comparison_json`.

    Raises
    ------
    ValueError
        For a formula, column or value the harness cannot fit, before any fit.
    """
    from harness.engines.lme4 import _r_env
    from harness.pipeline.runner import fit_design

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be a whole number from 0 to 2**32 - 1")
    spec = ModelSpec(formula, sigma_by=sigma_by, priors=priors, name=name, family=family, link=link)
    from harness.engines.registry import check_installed, resolve_engines

    engines = resolve_engines(engines)
    check_installed(engines)
    # Fail on bad input, and on a missing R (with how to install it), before any sampling.
    design = build_design(spec, data)
    for note in design.notes:
        log.warning(note)
    from harness.versions import r_ready_cheap

    if not side_process or not r_ready_cheap():
        _r_env()  # starts R here (the side process would start its own), or says what is missing
    from harness.pipeline.scale import settings_for_scale
    from harness.pipeline.settings import settings_from_env

    settings, scale_note = settings_for_scale(
        design, settings if settings is not None else settings_from_env()
    )
    if scale_note:
        design.notes.append(scale_note)
    result = fit_design(
        (spec, data),
        seed=seed,
        settings=settings,
        cache_dir=cache_dir,
        refit=refit,
        render=_render_hook() if figures else None,
        side_process=side_process,
        engines=engines,
    )
    # Fits are cached by the cleaned data, so a cached comparison may predate this file's
    # dropped rows: the reader must still be told what was dropped.
    missing = [n for n in design.notes if n not in result.comparison.notes]
    if missing:
        result.comparison = dataclasses.replace(
            result.comparison, notes=[*missing, *result.comparison.notes]
        )
    return result


def _render_hook() -> Any:
    """The report's figure renderer, handed to the pipeline (which never imports report code)."""
    from harness.report.page import render_figures

    return render_figures


# --------------------------------------------------------------------------- JSON


def _table(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    if frame is None:
        return []
    # pandas writes NaN as null and numpy scalars as plain numbers.
    return json.loads(frame.to_json(orient="records", double_precision=15, date_format="iso"))


def _plain(value: Any) -> Any:
    """Make a value JSON-safe (NaN and infinities become null)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _table(value)
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _same_model_json(result: DesignResult) -> dict[str, Any]:
    sm = result.same_model
    payload: dict[str, Any] = {"status": result.same_model_status, "available": sm is not None}
    if sm is not None:
        details = sm.to_dict() if hasattr(sm, "to_dict") else dataclasses.asdict(sm)
        payload.update(_plain(details))
        payload["ok"] = bool(getattr(sm, "ok", False))
    return payload


def _same_model_bayes_json(result: DesignResult) -> dict[str, Any] | None:
    """The PyMC-vs-brms log-density identity; None when it was not asked for."""
    check = result.same_model_bayes
    if check is None:
        status = result.same_model_bayes_status
        return {"status": status, "available": False} if status else None
    return _plain(
        {
            "status": result.same_model_bayes_status,
            "available": True,
            "ok": bool(check.ok),
            "max_abs_diff": check.max_abs_diff,
            "tolerance": check.tolerance,
            "reasons": list(check.reasons),
            "table": check.table,
        }
    )


def _bayes_pairs_json(result: DesignResult) -> list[dict[str, Any]]:
    """Each comparison of two Bayesian fits: its rows, lme4 | a | b side by side, the sentence."""
    from harness.checks.compare_bayes import gap_side, three_way_table

    out = []
    for (a, b), bayes in result.bayes_pairs.items():
        reference = result.comparisons.get((result.reference, a))
        labels = {n: get_engine(n).label for n in (a, b)}
        out.append(
            {
                "engines": [a, b],
                "verdict": bayes.verdict,
                "max_abs_z": bayes.max_abs_z,
                "z_max": bayes.z_max,
                "gap_side": gap_side(bayes, reference, labels),  # type: ignore[arg-type]
                "three_way": _table(three_way_table(bayes, reference)),  # type: ignore[arg-type]
                "table": _table(bayes.table),
            }
        )
    return out


def comparison_json(
    result: DesignResult, *, source: str | None = None, rows_read: int | None = None
) -> dict[str, Any]:
    """The comparison tables, the same-model result and what shaped them, as plain JSON values.

    Parameters
    ----------
    result : DesignResult
    source : str, optional
        Where the data came from (the CSV path).
    rows_read : int, optional
        Rows in the file before missing values were dropped.
    """
    cmp, freq, design = result.comparison, result.freq, result.design
    bayes = result.bayes_info
    notes = list(dict.fromkeys([*design.notes, *cmp.notes]))
    return _plain(
        {
            "format": JSON_FORMAT,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "name": result.name,
            "data": {
                "source": source,
                "rows_read": rows_read if rows_read is not None else len(result.data),
                "rows_used": design.n,
                "rows_dropped": design.n_dropped,
                "columns_dropped": list(design.dropped_columns),
                "data_hash": design.data_hash(),
            },
            "spec": {
                "formula": result.spec.formula,
                "sigma_by": result.spec.sigma_by,
                "priors": result.spec.priors if isinstance(result.spec.priors, str) else "custom",
                "parameterization": result.spec.parameterization,
                "reml": result.spec.reml,
            },
            "verdict": result.verdict,
            "notes": notes,
            "lme4": {
                "engine": freq.engine,
                "method": freq.method,
                "stand_in": freq.stand_in,
                "singular": freq.singular,
                "converged": freq.converged,
                "loglik": freq.loglik,
                "loglik_ml": freq.loglik_ml,
                "reml_criterion": freq.reml_criterion,
                "df_method": freq.df_method,
                "messages": list(freq.messages),
                "r_call": freq.r_call,
            },
            "pymc": {
                "sampler": bayes.sampler,
                "seed": result.seed,
                "chains": bayes.chains,
                "draws": bayes.draws,
                "tune": bayes.tune,
                "sampler_stats": cmp.sampler_stats,
                "priors": bayes.priors.table(),
                "target_accept": bayes.settings.get("target_accept"),
                "parameterization_per_block": {
                    b.label: "centred"
                    if b.label in bayes.settings.get("centered", [])
                    else "non-centred"
                    for b in design.blocks
                },
                "adaptive": bayes.settings.get("adaptive"),
            },
            "same_model": _same_model_json(result),
            "tables": {name: _table(frame) for name, frame in cmp.tables().items()},
            "engines": list(result.engines),
            "bayes_pairs": _bayes_pairs_json(result),
            "same_model_bayes": _same_model_bayes_json(result),
            "versions": result.versions,
            "cached": result.cached,
        }
    )


# --------------------------------------------------------------------------- writing


def write_outputs(
    result: DesignResult,
    report: str | os.PathLike[str] | None,
    json_path: str | os.PathLike[str] | None = None,
    *,
    source: str | None = None,
    rows_read: int | None = None,
) -> list[Path]:
    """Write the report and the JSON together: both appear, or neither does.

    Both are rendered in memory first, then written to temporary files next
    to the targets and renamed only when both are complete
    (:func:`harness._io.atomic_write`, which also refuses special files).

    Returns
    -------
    list of Path
        The files written.
    """
    from harness.report.page import render_report

    items: dict[str | os.PathLike[str], str] = {}
    if json_path is not None:
        payload = json.dumps(
            comparison_json(result, source=source, rows_read=rows_read),
            indent=2,
            allow_nan=False,
        )
        items[Path(json_path)] = payload + "\n"
    if report is not None:
        items[Path(report)] = render_report(result)
    return atomic_write(items)


# --------------------------------------------------------------------------- command line


def run_compare_command(args: argparse.Namespace) -> int:
    """``harness compare CSV --formula F``: fit, compare, check and write the report (and JSON).

    Returns
    -------
    int
        0 when the report (and JSON) were written.  Any failure raises, and
        :func:`harness.cli.main` turns it into one line and exit status 1;
        no output file is left behind.
    """
    csv = Path(args.csv)
    out = Path(args.out) if args.out is not None else Path("reports") / f"{csv.stem}.html"
    json_path = Path(args.json) if getattr(args, "json", None) is not None else None
    # Before any work: no output over the data, over the other output, or on a special file.
    check_outputs({"--out": out, "--json": json_path}, inputs=[csv])
    from harness.pipeline.settings import settings_from_args

    settings = settings_from_args(args)
    data = read_data(csv)
    result = compare_data(
        data,
        args.formula,
        sigma_by=args.sigma_by,
        priors=args.priors,
        seed=args.seed,
        name=csv.stem,
        family=getattr(args, "family", "gaussian"),
        link=getattr(args, "link", None),
        settings=settings,
        side_process=True,
        engines=getattr(args, "engines", None),
    )
    written = write_outputs(result, out, json_path, source=str(csv), rows_read=len(data))
    same = result.same_model_status or "not run"
    stats = result.comparison.sampler_stats
    print(
        f"{csv.name}: verdict {result.verdict}; same-model check: {same}; "
        f"{result.design.n} rows used ({result.design.n_dropped} dropped); "
        f"divergences {stats.get('divergences')}"
    )
    adaptive = result.bayes_info.settings.get("adaptive")
    if adaptive:
        print(f"  sampling: {len(adaptive['rounds'])} round(s); {adaptive['reason']}")
    for (a, b), bayes in result.bayes_pairs.items():
        print(f"  {a} vs {b}: {bayes.verdict} (max |diff| {bayes.max_abs_z:.2f} combined MCSE)")
    if result.same_model_bayes_status:
        print(f"  log-density identity PyMC / brms: {result.same_model_bayes_status}")
    for path in written:
        print(f"  -> {path}")
    return 0
