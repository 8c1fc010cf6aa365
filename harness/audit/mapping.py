"""The harness's row names for a formula, and the user's quantities carried onto them.

``MAPPING`` keys are the harness's row names: fixed effects by lme4's term names
(``"(Intercept)"``, ``"tx"``), variance components as the comparison names them
(``"group: sd(tx)"``, ``"Subject: cor((Intercept),Days)"``, ``"sigma"``,
``"sigma: arm=control"``) and offsets as ``"FACTOR: TERM"``.  Values are a
variable name of the user's model (``"b"``, or ``"B[1]"`` for one entry of a
vector) or a callable taking the draws (an ``xarray.Dataset``) and returning a
``DataArray`` over chain and draw (plus a level dimension for offsets whose
coordinates are the group levels).  :func:`harness_draws` turns the user's
draws into a Dataset under the harness's own posterior names, so the harness's
likelihood, random-effects law and comparison read it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from harness.audit.loading import AuditError
from harness.model.spec import Design, RandomBlock
from harness.names import corr_var, level_dim, offsets_var, sd_var, term_b_dim, term_dim

__all__ = ["Row", "harness_draws", "harness_rows", "resolve"]

SAMPLE_DIMS = ("chain", "draw")
_INDEXED = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<index>\s*\d+\s*(,\s*\d+\s*)*)\]$")


@dataclass(frozen=True)
class Row:
    """One harness row: its name, kind (fixed, sd, cor, sigma, offsets) and where it lives."""

    name: str
    kind: str
    block: RandomBlock | None = None
    term: str | None = None
    term_b: str | None = None
    level: str | None = None


def harness_rows(design: Design) -> list[Row]:
    """Every row the harness compares for a design, in its order."""
    rows = [Row(t, "fixed", term=t) for t in design.fixed_terms]
    for block in design.blocks:
        rows += [Row(f"{block.label}: sd({t})", "sd", block, t) for t in block.terms]
        if block.correlated and block.n_terms > 1:
            for i, a in enumerate(block.terms):
                for b in block.terms[i + 1 :]:
                    rows.append(Row(f"{block.label}: cor({a},{b})", "cor", block, a, b))
    if design.family.has_scale:
        if design.sigma_levels is not None:
            rows += [
                Row(f"sigma: {design.spec.sigma_by}={lev}", "sigma", level=lev)
                for lev in design.sigma_levels
            ]
        else:
            rows.append(Row("sigma", "sigma"))
    for block in design.blocks:
        rows += [Row(f"{block.label}: {t}", "offsets", block, t) for t in block.terms]
    return rows


def _valid_names(rows: list[Row]) -> str:
    return ", ".join(repr(r.name) for r in rows)


def check_keys(mapping: Mapping[str, Any], design: Design) -> list[Row]:
    """The rows, after refusing unknown and missing keys (errors name them and the valid ones)."""
    rows = harness_rows(design)
    names = {r.name for r in rows}
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise AuditError(
            f"MAPPING key {unknown[0]!r} is not a harness row for formula "
            f"{design.spec.formula!r}; the rows are: {_valid_names(rows)}"
        )
    missing = [r.name for r in rows if r.name not in mapping]
    if missing:
        raise AuditError(
            f"MAPPING has no entry for {', '.join(repr(m) for m in missing)} "
            f"(formula {design.spec.formula!r}); map every row: {_valid_names(rows)}"
        )
    for key, value in mapping.items():
        if not (isinstance(value, str) or callable(value)):
            raise AuditError(
                f"MAPPING[{key!r}] must be a variable name or a callable on the posterior, "
                f"not {type(value).__name__}"
            )
    return rows


def _lookup(key: str, value: Any, draws: xr.Dataset) -> xr.DataArray:
    if callable(value):
        try:
            out = value(draws)
        except Exception as err:
            raise AuditError(
                f"MAPPING[{key!r}]: the callable raised {type(err).__name__}: {err}"
            ) from err
        if not isinstance(out, xr.DataArray):
            raise AuditError(
                f"MAPPING[{key!r}]: the callable must return an xarray.DataArray, "
                f"not {type(out).__name__}"
            )
        return out
    match = _INDEXED.match(value.strip())
    name = match["name"].strip() if match else value.strip()
    if name not in draws:
        known = ", ".join(sorted(str(v) for v in draws.data_vars))
        raise AuditError(
            f"MAPPING[{key!r}] = {value!r}: {name!r} is not a variable of the model "
            f"(its variables: {known})"
        )
    array = draws[name]
    if match:
        index = [int(i) for i in match["index"].split(",")]
        extra = [d for d in array.dims if d not in SAMPLE_DIMS]
        if len(index) != len(extra):
            raise AuditError(
                f"MAPPING[{key!r}] = {value!r}: {name!r} has {len(extra)} dimension(s) "
                f"{extra} besides chain and draw, the index gives {len(index)}"
            )
        for dim, i in zip(extra, index, strict=True):
            if i >= array.sizes[dim]:
                raise AuditError(
                    f"MAPPING[{key!r}] = {value!r}: index {i} is outside {dim!r} (size {array.sizes[dim]})"
                )
        array = array.isel(dict(zip(extra, index, strict=True)))
    return array


def _scalar_draws(row: Row, value: Any, draws: xr.DataArray) -> xr.DataArray:
    extra = [d for d in draws.dims if d not in SAMPLE_DIMS]
    missing = [d for d in SAMPLE_DIMS if d not in draws.dims]
    if extra or missing:
        raise AuditError(
            f"MAPPING[{row.name!r}] = {value!r} has dims {tuple(draws.dims)}; a {row.kind} row "
            "needs one value per draw, dims ('chain', 'draw') (pick one entry: 'name[i]')"
        )
    return draws.drop_vars([c for c in draws.coords if c not in SAMPLE_DIMS]).transpose(
        *SAMPLE_DIMS
    )


def _offset_draws(row: Row, value: Any, draws: xr.DataArray, design: Design) -> xr.DataArray:
    block = row.block
    assert block is not None
    extra = [d for d in draws.dims if d not in SAMPLE_DIMS]
    if len(extra) != 1 or any(d not in draws.dims for d in SAMPLE_DIMS):
        raise AuditError(
            f"MAPPING[{row.name!r}] = {value!r} has dims {tuple(draws.dims)}; offsets need "
            f"('chain', 'draw', <level dim>) with the levels of {block.factor!r} as coordinates"
        )
    dim = extra[0]
    levels = [str(v) for v in draws[dim].values]
    known = set(block.levels)
    strange = [lev for lev in levels if lev not in known]
    if strange:
        raise AuditError(
            f"MAPPING[{row.name!r}] = {value!r}: the level coordinates of {dim!r} "
            f"({', '.join(levels[:4])}{', ...' if len(levels) > 4 else ''}) are not levels of "
            f"{block.factor!r} (e.g. {', '.join(block.levels[:4])}); give the model "
            "coords={...: levels} or map a callable that labels them"
        )
    if len(set(levels)) != len(levels):
        raise AuditError(f"MAPPING[{row.name!r}]: level coordinates repeat")
    absent = [lev for lev in block.levels if lev not in set(levels)]
    if absent:
        # A level the user leaves out is harmless only where its column of Z is 0 on every row.
        k = block.terms.index(row.term or "")
        position = {lev: i for i, lev in enumerate(block.levels)}
        missing_idx = np.array([position[lev] for lev in absent])
        used = np.isin(block.group_index, missing_idx) & (block.values[:, k] != 0)
        if used.any():
            raise AuditError(
                f"MAPPING[{row.name!r}] has no offsets for levels {absent[:4]} of "
                f"{block.factor!r}, whose rows have a non-zero {row.term!r} column"
            )
    out = draws.rename({dim: level_dim(block)}).assign_coords({level_dim(block): levels})
    out = out.reindex({level_dim(block): block.levels}, fill_value=0.0)
    out = out.drop_vars([c for c in out.coords if c not in (*SAMPLE_DIMS, level_dim(block))])
    out = out.transpose(*SAMPLE_DIMS, level_dim(block))
    out.attrs = {"supplied": [lev for lev in block.levels if lev in set(levels)]}
    return out


def resolve(
    mapping: Mapping[str, Any], draws: xr.Dataset, design: Design
) -> dict[str, xr.DataArray]:
    """Every harness row's draws, from the user's draws; errors name the key."""
    rows = check_keys(mapping, design)
    out: dict[str, xr.DataArray] = {}
    for row in rows:
        value = mapping[row.name]
        array = _lookup(row.name, value, draws)
        if row.kind == "offsets":
            out[row.name] = _offset_draws(row, value, array, design)
        else:
            out[row.name] = _scalar_draws(row, value, array)
    return out


def harness_draws(mapping: Mapping[str, Any], draws: xr.Dataset, design: Design) -> xr.Dataset:
    """The user's draws under the harness's posterior names (``beta``, ``sd_*``, ``corr_*``, ``u_*``, ``sigma``).

    Returns
    -------
    xarray.Dataset
        Laid out as :class:`harness.engines.pymc.BayesFit` posteriors are, so
        the harness's likelihood and comparison read it unchanged.
    """
    values = resolve(mapping, draws, design)
    rows = harness_rows(design)
    out: dict[str, xr.DataArray] = {}
    out["beta"] = (
        xr.concat([values[t] for t in design.fixed_terms], dim="fixed_term")
        .assign_coords(fixed_term=design.fixed_terms)
        .transpose(*SAMPLE_DIMS, "fixed_term")
    )
    for block in design.blocks:
        out[sd_var(block)] = (
            xr.concat([values[f"{block.label}: sd({t})"] for t in block.terms], dim=term_dim(block))
            .assign_coords({term_dim(block): block.terms})
            .transpose(*SAMPLE_DIMS, term_dim(block))
        )
        if block.correlated and block.n_terms > 1:
            k = block.n_terms
            first = values[f"{block.label}: sd({block.terms[0]})"]
            corr = np.ones((*first.shape, k, k))
            for i, a in enumerate(block.terms):
                for j in range(i + 1, k):
                    c = values[f"{block.label}: cor({a},{block.terms[j]})"].values
                    corr[..., i, j] = corr[..., j, i] = c
            out[corr_var(block)] = xr.DataArray(
                corr,
                dims=(*SAMPLE_DIMS, term_dim(block), term_b_dim(block)),
                coords={term_dim(block): block.terms, term_b_dim(block): block.terms},
            )
        out[offsets_var(block)] = (
            xr.concat([values[f"{block.label}: {t}"] for t in block.terms], dim=term_dim(block))
            .assign_coords({term_dim(block): block.terms})
            .transpose(*SAMPLE_DIMS, level_dim(block), term_dim(block))
        )
    sigma_rows = [r for r in rows if r.kind == "sigma"]
    if sigma_rows and sigma_rows[0].level is not None:
        out["sigma"] = (
            xr.concat([values[r.name] for r in sigma_rows], dim="sigma_level")
            .assign_coords(sigma_level=[r.level for r in sigma_rows])
            .transpose(*SAMPLE_DIMS, "sigma_level")
        )
    elif sigma_rows:
        out["sigma"] = values["sigma"]
    shape = out["beta"].shape[:2]
    for name, array in out.items():
        if array.shape[:2] != shape:
            raise AuditError(f"{name}: draws of shape {array.shape[:2]}, expected {shape}")
    supplied = {
        block.label: [
            lev
            for lev in block.levels
            if all(lev in values[f"{block.label}: {t}"].attrs["supplied"] for t in block.terms)
        ]
        for block in design.blocks
    }
    ds = xr.Dataset(out, attrs={"supplied_levels": supplied})
    return ds.assign_coords(chain=np.arange(shape[0]), draw=np.arange(shape[1]))
