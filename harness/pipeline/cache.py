"""The on-disk fit cache: JSON entries checked against their keys, never pickles.

Contract
--------
* An entry is ``<root>/<kind>/<key>.json`` (plus ``<key>.nc`` for the PyMC
  draws).  The JSON document holds the cache format, the kind, the key, the
  full key parts (data hash, spec, settings, versions, code hash) whose digest
  is the key, a SHA-256 and size of every side file, free-form ``meta`` and
  the encoded value.
* Values are encoded by :func:`encode` (dataclasses, DataFrames with their
  dtypes, ndarrays, dicts with any scalar keys, lists, tuples, scalars) and
  decoded only into the classes listed in :data:`ALLOWED_CLASSES`; a class
  name from the file is looked up there, never imported.  Nothing is read
  with ``pickle``; stray ``.pkl`` files are ignored.
* On load the entry must match the key the caller computed: same format,
  kind, key, the caller's key parts, a key that is the digest of the stored
  parts, side files of the recorded hash, and a value of the expected shape.
  Anything else (a file of another data set copied over, garbage, truncated
  netCDF, valid JSON of the wrong shape) is logged as a warning naming the
  file and the reason, and the caller refits and overwrites it.
* Every file is written to ``.<name>.<host>-<pid>.<random>.tmp`` and renamed;
  side files first, the JSON document last (its presence marks a complete
  entry).  Temp files of dead writers, or older than an hour, are removed
  when the cache is opened.
* A cache that cannot be written (read-only folder, full disk) logs a warning
  and the caller keeps its result.
* The folder is ``$HARNESS_CACHE_DIR``, else the user's cache folder
  (``platformdirs.user_cache_dir("harness")``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness._io import host_tag, write_via_temp

log = logging.getLogger("harness")

#: Bump when the layout of cached entries changes (it enters every key).
#: 3: fits carry their engine name (``BayesFit.engine``), stages are keyed per engine.
CACHE_FORMAT = "3"
FORMAT_NAME = "harness-fit-cache"
#: The kinds of entries that are not engine fits; every registered engine's name is one too.
STAGE_KINDS = ("same_model", "same_model_bayes", "compare", "figures")


def kinds() -> tuple[str, ...]:
    """Every kind of entry (folder) the cache holds: the registered engines' and the stages'."""
    from harness.engines.registry import ENGINES

    return (*ENGINES, *STAGE_KINDS)


STALE_TMP_SECONDS = 3600.0

#: The only classes a cache entry may build: name in the file -> (module, attribute).
ALLOWED_CLASSES: dict[str, tuple[str, str]] = {
    "FreqFit": ("harness.fits", "FreqFit"),
    "BayesFit": ("harness.fits", "BayesFit"),
    "Comparison": ("harness.checks.compare", "Comparison"),
    "BayesComparison": ("harness.checks.compare_bayes", "BayesComparison"),
    "SameModelBayes": ("harness.checks.same_model_bayes", "SameModelBayes"),
    "SameModel": ("harness.checks.same_model", "SameModel"),
    "BlockValue": ("harness.checks.same_model", "BlockValue"),
    "ParameterValues": ("harness.checks.same_model", "ParameterValues"),
    "ResolvedPriors": ("harness.model.priors", "ResolvedPriors"),
    "ModelSpec": ("harness.model.spec", "ModelSpec"),
    "Prior": ("harness.model.spec", "Prior"),
    "Design": ("harness.model.spec", "Design"),
    "RandomBlock": ("harness.model.spec", "RandomBlock"),
    "BarTerm": ("harness.model.spec", "BarTerm"),
    "ParsedFormula": ("harness.model.spec", "ParsedFormula"),
}

_KEY_RE = re.compile(r"^[0-9a-f]{24}$")
_NUMERIC_DTYPE_RE = re.compile(r"^[<>|=][biufcMm]\d+(\[[a-zA-Z]+\])?$")
_TMP_RE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


class CacheEntryError(ValueError):
    """A cache entry that cannot be used (damaged, mismatched or of the wrong shape)."""


# --------------------------------------------------------------------------- keys and folders


def digest(parts: Any) -> str:
    """The cache key of a set of key parts (24 hex digits)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _normalized(parts: Any) -> Any:
    """Key parts as they read back from JSON (tuples as lists, odd types as strings)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def resolve_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The fit cache folder: ``path``, else ``$HARNESS_CACHE_DIR``, else the user's cache folder.

    The default is ``platformdirs.user_cache_dir("harness")`` (for example
    ``~/.cache/harness`` on Linux), never the current folder.
    """
    if path is not None:
        return Path(path)
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("harness", appauthor=False))


# --------------------------------------------------------------------------- codec


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _numeric_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or not _NUMERIC_DTYPE_RE.match(text):
        raise CacheEntryError(f"not a numeric dtype: {text!r}")
    return np.dtype(text)


def _from_b64(text: Any, dtype: np.dtype, shape: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise CacheEntryError("array payload is not a string")
    array = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    return array.reshape(tuple(int(s) for s in shape)).copy()


def _encode_values(values: pd.Series | pd.Index, context: Mapping[str, Any], where: str) -> dict:
    """One column (or index) with its dtype, so that it reads back with the same dtype."""
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = np.asarray(values.codes if isinstance(values, pd.Index) else values.cat.codes)
        return {
            "kind": "category",
            "categories": _encode_values(dtype.categories, context, where),
            "ordered": bool(dtype.ordered),
            "codes": _b64(codes),
            "codes_dtype": codes.dtype.str,
        }
    if isinstance(dtype, np.dtype) and dtype.kind in "biufcMm":
        return {"kind": "numpy", "dtype": dtype.str, "data": _b64(values.to_numpy())}
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        # Object columns hold anything the codec holds (dicts, lists, strings, floats);
        # missing scalars keep their kind (None, nan, NA) through the codec.
        return {"kind": "object", "items": [encode(v, context, where) for v in values.tolist()]}
    # Extension arrays: missing values as null, read back as the dtype's own NA.
    items = [None if _is_missing(v) else encode(v, context, where) for v in values.tolist()]
    if isinstance(dtype, pd.StringDtype):
        return {
            "kind": "string",
            "storage": dtype.storage,
            "na_nan": dtype.na_value is np.nan,
            "items": items,
        }
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.name in _NULLABLE:
        return {"kind": "nullable", "dtype": dtype.name, "items": items}
    raise TypeError(f"{where}: cannot cache a column of dtype {dtype}")


_NULLABLE = (
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float32",
    "Float64",
    "boolean",
)


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _decode_values(doc: Any, n: int, context: Mapping[str, Any], where: str) -> Any:
    """An array or ExtensionArray of length ``n`` from :func:`_encode_values`."""
    if not isinstance(doc, dict):
        raise CacheEntryError(f"{where}: column is not an object")
    kind = doc.get("kind")
    if kind == "numpy":
        values = _from_b64(doc["data"], _numeric_dtype(doc["dtype"]), [-1])
    elif kind == "category":
        codes = _from_b64(doc["codes"], _numeric_dtype(doc["codes_dtype"]), [-1])
        categories = _decode_values(doc["categories"], -1, context, where)
        values = pd.Categorical.from_codes(
            codes, categories=pd.Index(categories), ordered=bool(doc["ordered"])
        )
    elif kind == "object":
        items = _items(doc, context, where)
        values = np.empty(len(items), dtype=object)
        for i, item in enumerate(items):  # nested lists must stay one cell each
            values[i] = item
    elif kind == "string":
        storage = doc.get("storage")
        if storage not in ("python", "pyarrow"):
            raise CacheEntryError(f"{where}: unknown string storage {storage!r}")
        # pandas >= 2.3 (the default ``str`` dtype of pandas 3) has NaN-valued strings.
        dtype = (
            pd.StringDtype(storage, na_value=np.nan)
            if doc.get("na_nan")
            else pd.StringDtype(storage)
        )
        items = _items(doc, context, where)
        values = pd.array(items, dtype=dtype)
    elif kind == "nullable":
        if doc.get("dtype") not in _NULLABLE:
            raise CacheEntryError(f"{where}: unknown dtype {doc.get('dtype')!r}")
        values = pd.array(_items(doc, context, where), dtype=doc["dtype"])
    else:
        raise CacheEntryError(f"{where}: unknown column kind {kind!r}")
    if n >= 0 and len(values) != n:
        raise CacheEntryError(f"{where}: column of length {len(values)}, expected {n}")
    return values


def _items(doc: dict, context: Mapping[str, Any], where: str) -> list[Any]:
    items = doc.get("items")
    if not isinstance(items, list):
        raise CacheEntryError(f"{where}: column items are not a list")
    return [decode(v, context, where) for v in items]


def _encode_index(index: pd.Index, context: Mapping[str, Any], where: str) -> dict:
    name = encode(index.name, context, where)
    if isinstance(index, pd.RangeIndex):
        return {"range": [index.start, index.stop, index.step], "name": name}
    if isinstance(index, pd.MultiIndex):
        raise TypeError(f"{where}: cannot cache a MultiIndex")
    return {"values": _encode_values(index, context, where), "name": name}


def _decode_index(doc: Any, n: int, context: Mapping[str, Any], where: str) -> pd.Index:
    if not isinstance(doc, dict):
        raise CacheEntryError(f"{where}: index is not an object")
    name = decode(doc.get("name"), context, where)
    if "range" in doc:
        start, stop, step = (int(v) for v in doc["range"])
        index = pd.RangeIndex(start, stop, step, name=name)
        if n >= 0 and len(index) != n:
            raise CacheEntryError(f"{where}: index of length {len(index)}, expected {n}")
        return index
    values = _decode_values(doc.get("values"), n, context, where)
    return pd.Index(values, name=name, dtype=_dtype_of(values))


def _dtype_of(values: Any) -> Any:
    """The decoded array's own dtype, so that pandas does not infer another (object -> str)."""
    return values.dtype


def _encode_frame(frame: pd.DataFrame, context: Mapping[str, Any], where: str) -> dict:
    return {
        "columns": _encode_index(frame.columns, context, where),
        "index": _encode_index(frame.index, context, where),
        "data": [
            _encode_values(frame.iloc[:, i], context, f"{where}[{frame.columns[i]!r}]")
            for i in range(frame.shape[1])
        ],
        "attrs": encode(dict(frame.attrs), context, where),
    }


def _decode_frame(doc: Any, context: Mapping[str, Any], where: str) -> pd.DataFrame:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise CacheEntryError(f"{where}: table is not an object with data")
    index = _decode_index(doc.get("index"), -1, context, where)
    columns = _decode_index(doc.get("columns"), len(doc["data"]), context, where)
    arrays = [_decode_values(c, len(index), context, where) for c in doc["data"]]
    frame = pd.DataFrame(
        {i: pd.Series(a, index=index, dtype=_dtype_of(a)) for i, a in enumerate(arrays)},
        index=index,
    )
    frame.columns = columns
    attrs = decode(doc.get("attrs") or {}, context, where)
    if isinstance(attrs, dict):
        frame.attrs.update(attrs)
    return frame


def _allowed_class(name: Any) -> type:
    if name not in ALLOWED_CLASSES:
        raise CacheEntryError(f"class {name!r} is not one the cache may build")
    module, attribute = ALLOWED_CLASSES[name]
    return getattr(importlib.import_module(module), attribute)


def encode(value: Any, context: Mapping[str, Any] | None = None, where: str = "value") -> Any:
    """A JSON-ready document for ``value``.

    Parameters
    ----------
    value : object
        None, bool, int, float, str, list, tuple, dict, numpy scalars and
        arrays, pandas DataFrame/Series, or a dataclass of
        :data:`ALLOWED_CLASSES` holding these.
    context : mapping, optional
        Objects the reader supplies again (``{"design": design}``): a field
        holding one of them (the same object) is stored as a reference.
    where : str
        Path used in error messages.

    Raises
    ------
    TypeError
        For a value the cache cannot hold.
    """
    context = context or {}
    for name, obj in context.items():
        if value is obj and obj is not None:
            return {"$ref": name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if value is pd.NA:
        return {"$na": None}
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, context, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, context, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, context, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "$dict": [
                [encode(k, context, where), encode(v, context, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    if isinstance(value, pd.DataFrame):
        return {"$frame": _encode_frame(value, context, where)}
    if isinstance(value, pd.Series):
        return {
            "$series": {
                "values": _encode_values(value, context, where),
                "index": _encode_index(value.index, context, where),
                "name": encode(value.name, context, where),
            }
        }
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufcMm":
            return {
                "$array": {
                    "dtype": value.dtype.str,
                    "shape": list(value.shape),
                    "data": _b64(value),
                }
            }
        if value.dtype.kind in "OU":
            return {
                "$array": {
                    "dtype": "O" if value.dtype.kind == "O" else "U",
                    "shape": list(value.shape),
                    "items": [encode(v, context, where) for v in value.ravel().tolist()],
                }
            }
        raise TypeError(f"{where}: cannot cache an array of dtype {value.dtype}")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if ALLOWED_CLASSES.get(name) != (type(value).__module__, type(value).__qualname__):
            raise TypeError(f"{where}: cannot cache a {type(value).__qualname__}")
        return {
            "$dataclass": name,
            "fields": {
                f.name: encode(getattr(value, f.name), context, f"{where}.{f.name}")
                for f in dataclasses.fields(value)
            },
        }
    raise TypeError(f"{where}: cannot cache a value of type {type(value).__qualname__}")


def decode(doc: Any, context: Mapping[str, Any] | None = None, where: str = "value") -> Any:
    """The value :func:`encode` wrote; raises :class:`CacheEntryError` on anything else."""
    context = context or {}
    if doc is None or isinstance(doc, (bool, int, float, str)):
        return doc
    if isinstance(doc, list):
        return [decode(v, context, where) for v in doc]
    if not isinstance(doc, dict):
        raise CacheEntryError(f"{where}: unexpected JSON value {type(doc).__name__}")
    markers = [k for k in doc if k.startswith("$")]
    if not markers:
        return {k: decode(v, context, f"{where}[{k!r}]") for k, v in doc.items()}
    if len(doc) != 1 and markers != ["$dataclass"]:
        raise CacheEntryError(f"{where}: malformed tagged value {sorted(doc)}")
    tag = markers[0]
    body = doc[tag]
    if tag == "$ref":
        if body not in context:
            raise CacheEntryError(f"{where}: refers to {body!r}, which the caller did not supply")
        return context[body]
    if tag == "$na":
        return pd.NA
    if tag == "$tuple":
        if not isinstance(body, list):
            raise CacheEntryError(f"{where}: tuple is not a list")
        return tuple(decode(v, context, where) for v in body)
    if tag == "$dict":
        if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise CacheEntryError(f"{where}: dict is not a list of pairs")
        return {decode(k, context, where): decode(v, context, where) for k, v in body}
    if tag == "$frame":
        return _decode_frame(body, context, where)
    if tag == "$series":
        if not isinstance(body, dict):
            raise CacheEntryError(f"{where}: series is not an object")
        index = _decode_index(body.get("index"), -1, context, where)
        values = _decode_values(body.get("values"), len(index), context, where)
        name = decode(body.get("name"), context, where)
        return pd.Series(values, index=index, name=name, dtype=_dtype_of(values))
    if tag == "$array":
        if not isinstance(body, dict) or not isinstance(body.get("shape"), list):
            raise CacheEntryError(f"{where}: array is not an object with a shape")
        if "data" in body:
            return _from_b64(body["data"], _numeric_dtype(body["dtype"]), body["shape"])
        items = [decode(v, context, where) for v in body.get("items") or []]
        shape = tuple(int(s) for s in body["shape"])
        if body.get("dtype") == "U":
            return np.array(items, dtype=str).reshape(shape)
        out = np.empty(len(items), dtype=object)
        for i, item in enumerate(items):
            out[i] = item
        return out.reshape(shape)
    if tag == "$dataclass":
        return _decode_dataclass(body, doc.get("fields"), context, where)
    raise CacheEntryError(f"{where}: unknown tag {tag!r}")


def _decode_dataclass(name: Any, fields: Any, context: Mapping[str, Any], where: str) -> Any:
    cls = _allowed_class(name)
    if not isinstance(fields, dict):
        raise CacheEntryError(f"{where}: {name} fields are not an object")
    expected = {f.name: f for f in dataclasses.fields(cls)}
    if set(fields) != set(expected):
        missing, extra = sorted(set(expected) - set(fields)), sorted(set(fields) - set(expected))
        raise CacheEntryError(f"{where}: {name} fields differ (missing {missing}, extra {extra})")
    values = {k: decode(v, context, f"{where}.{k}") for k, v in fields.items()}
    for f in expected.values():
        _check_annotation(values[f.name], f.type, f"{where}.{f.name}")
    obj = cls(**{k: v for k, v in values.items() if expected[k].init})
    for k, v in values.items():
        if not expected[k].init:
            object.__setattr__(obj, k, v)
    return obj


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "float": (float, int),
    "int": (int,),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
    "list": (list,),
    "dict": (dict,),
    "tuple": (tuple,),
    "pd.DataFrame": (pd.DataFrame,),
    "DataFrame": (pd.DataFrame,),
    "np.ndarray": (np.ndarray,),
    "Mapping": (Mapping,),
}


def _check_annotation(value: Any, annotation: Any, where: str) -> None:
    """Shallow check of a decoded field against its annotation (for what can be named).

    Unknown annotations (``Any``, other classes) pass: the check catches a file of the
    wrong shape, it does not replace a type checker.
    """
    if not isinstance(annotation, str):
        return
    allowed: list[type] = []
    for alternative in annotation.split("|"):
        head = alternative.strip().split("[", 1)[0]
        if head in ("Any", "object") or head.startswith(("Literal", "Parameterization")):
            return
        if head in _SIMPLE_TYPES:
            allowed.extend(_SIMPLE_TYPES[head])
        elif head in ALLOWED_CLASSES:
            try:
                allowed.append(_allowed_class(head))
            except ImportError:
                return
        else:
            return
    if allowed and not isinstance(value, tuple(allowed)):
        raise CacheEntryError(f"{where}: {type(value).__name__} where {annotation} belongs")


# --------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temp file (:func:`harness._io.write_via_temp`)."""
    write_via_temp(path, lambda tmp: tmp.write_bytes(payload))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temp_files(root: Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove temp files a killed writer left in the cache's own folders.

    A temp file goes when its writer (same host) is no longer running, or when
    it is older than ``max_age`` seconds.  Only files named by :func:`harness._io.temp_path`
    inside ``root/<kind>/`` are touched.

    Returns
    -------
    list of Path
        The files removed.
    """
    removed: list[Path] = []
    host, now = host_tag(), time.time()
    for kind in kinds():
        folder = root / kind
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            found = _TMP_RE.match(entry.name)
            if found is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                age = now - entry.stat(follow_symlinks=False).st_mtime
                dead = found["host"] == host and not _pid_alive(int(found["pid"]))
                if dead or age > max_age:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError as err:
                log.debug("could not remove stale temp file %s (%s)", entry.path, err)
    if removed:
        log.info("removed %d stale temp file(s) from the fit cache %s", len(removed), root)
    return removed


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache


Shape = type | tuple[type, ...] | Mapping[str, Any] | Callable[[Any], None]


def check_shape(value: Any, shape: Shape, where: str = "value") -> None:
    """Raise :class:`CacheEntryError` unless ``value`` has ``shape``.

    ``shape`` is a class (or tuple of classes), a mapping of required keys to
    shapes (for dict entries), or a function that raises on a bad value.
    """
    if isinstance(shape, (type, tuple)):
        if not isinstance(value, shape):
            raise CacheEntryError(f"{where}: a {type(value).__name__}, expected {shape}")
    elif isinstance(shape, Mapping):
        if not isinstance(value, dict):
            raise CacheEntryError(f"{where}: a {type(value).__name__}, expected a dict")
        for key, inner in shape.items():
            if key not in value:
                raise CacheEntryError(f"{where}: no {key!r}")
            check_shape(value[key], inner, f"{where}[{key!r}]")
    else:
        try:
            shape(value)
        except CacheEntryError:
            raise
        except Exception as err:
            raise CacheEntryError(f"{where}: {err}") from err


class FitCache:
    """Entries ``<kind>/<key>.json`` (+ side files such as ``<key>.nc``); see the module docstring.

    Opening the cache removes stale temp files of killed writers.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        clean_stale_temp_files(self.root)

    def path(self, kind: str, key: str, suffix: str) -> Path:
        if kind not in kinds():
            raise ValueError(f"unknown cache kind {kind!r}")
        if not _KEY_RE.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / kind / f"{key}{suffix}"

    def load(
        self,
        kind: str,
        key: str,
        parts: Mapping[str, Any],
        *,
        shape: Shape = object,
        context: Mapping[str, Any] | None = None,
        files: tuple[str, ...] = (),
    ) -> tuple[Any, dict[str, Any]] | None:
        """The cached value and its meta, or None (missing, or unusable: logged, caller refits).

        Parameters
        ----------
        kind, key : str
            The entry.
        parts : mapping
            Key parts the entry must have been written with (all of them, or a
            subset, e.g. without the R versions on a machine without R).
        shape : class, tuple, mapping or function
            What the value must be (see :func:`check_shape`).
        context : mapping, optional
            Objects the value refers to (as given to :meth:`store`).
        files : tuple of str
            Side files (suffixes) whose recorded hash must match.
        """
        path = self.path(kind, key, ".json")
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_bytes())
            value = self._check(doc, kind, key, parts, files, context)
            check_shape(value, shape)
        except Exception as err:  # anything wrong with the file: say so and refit
            reason = err if isinstance(err, CacheEntryError) else f"{type(err).__name__}: {err}"
            log.warning("ignoring cache entry %s: %s; refitting", path, reason)
            return None
        return value, doc.get("meta") or {}

    def _check(
        self,
        doc: Any,
        kind: str,
        key: str,
        parts: Mapping[str, Any],
        files: tuple[str, ...],
        context: Mapping[str, Any] | None,
    ) -> Any:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CacheEntryError("not a harness cache entry")
        if doc.get("version") != CACHE_FORMAT:
            raise CacheEntryError(
                f"cache format {doc.get('version')!r}, this harness writes {CACHE_FORMAT!r}"
            )
        if doc.get("kind") != kind or doc.get("key") != key:
            raise CacheEntryError(
                f"entry is {doc.get('kind')!r}/{doc.get('key')!r}, expected {kind!r}/{key!r}"
            )
        stored = doc.get("parts")
        if not isinstance(stored, dict) or digest(stored) != key:
            raise CacheEntryError("its key parts do not hash to its key")
        expected = _normalized(dict(parts))
        differ = sorted(k for k in expected if stored.get(k) != expected[k])
        if differ:
            raise CacheEntryError(f"written for other key parts ({', '.join(differ)} differ)")
        recorded = doc.get("files") or {}
        for suffix in files:
            side = self.path(kind, key, suffix)
            info = recorded.get(suffix)
            if not isinstance(info, dict):
                raise CacheEntryError(f"no record of its {suffix} file")
            if not side.is_file():
                raise CacheEntryError(f"{side.name} is missing")
            if side.stat().st_size != info.get("size") or file_digest(side) != info.get("sha256"):
                raise CacheEntryError(f"{side.name} is not the file this entry wrote")
        return decode(doc.get("value"), context)

    def store(
        self,
        kind: str,
        key: str,
        value: Any,
        parts: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        *,
        context: Mapping[str, Any] | None = None,
        files: Mapping[str, Callable[[Path], None]] | None = None,
    ) -> bool:
        """Write an entry; on failure log a warning and return False (the caller keeps its result).

        Parameters
        ----------
        kind, key : str
            The entry; ``key`` must be ``digest(parts)``.
        value : object
            Anything :func:`encode` takes.
        parts : mapping
            The full key parts, stored and checked on load.
        meta : mapping, optional
            Free-form information for people (timings).
        context : mapping, optional
            Objects stored by reference (see :func:`encode`).
        files : mapping of suffix to writer, optional
            Side files, each written by ``writer(temp_path)`` before the entry.
        """
        path = self.path(kind, key, ".json")
        if digest(parts) != key:
            raise ValueError(f"key {key} is not the digest of its parts")
        try:
            doc = {
                "format": FORMAT_NAME,
                "version": CACHE_FORMAT,
                "kind": kind,
                "key": key,
                "parts": _normalized(dict(parts)),
                "meta": _normalized(dict(meta or {})),
                "files": {},
                "value": encode(value, context),
            }
            payload = json.dumps(doc).encode()  # no sort_keys: dict order is data
        except (TypeError, ValueError) as err:
            log.warning("not caching %s (%s)", path, err)
            return False
        try:
            for suffix, writer in (files or {}).items():
                side = self.path(kind, key, suffix)
                write_via_temp(side, writer)
                doc["files"][suffix] = {"size": side.stat().st_size, "sha256": file_digest(side)}
            if files:
                payload = json.dumps(doc).encode()  # no sort_keys: dict order is data
            atomic_write_bytes(path, payload)
        except Exception as err:  # a read-only or full disk costs the caching, not the result
            log.warning(
                "could not write the cache entry %s (%s); the result is not cached", path, err
            )
            return False
        return True

    def latest_for(self, kind: str, partial_key: str) -> str | None:
        """Key of the newest entry written under a version-less key (for machines without R)."""
        pointer = self.root / kind / f"latest-{partial_key}.txt"
        try:
            key = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _KEY_RE.match(key):
            log.warning("ignoring cache pointer %s: not a cache key", pointer)
            return None
        return key if self.path(kind, key, ".json").is_file() else None

    def set_latest(self, kind: str, partial_key: str, key: str) -> None:
        try:
            atomic_write_bytes(self.root / kind / f"latest-{partial_key}.txt", key.encode())
        except OSError as err:
            log.warning("could not write the cache pointer in %s (%s)", self.root / kind, err)


def load_idata(path: Path) -> Any:
    """InferenceData from a cached ``.nc`` file, read into memory."""
    import arviz as az

    try:
        idata = az.from_netcdf(str(path))
        # Read into memory: the file may be replaced by a later refit.
        for group in idata.groups():
            getattr(idata, group).load()
    except Exception as err:
        raise OSError(f"cannot read the cached draws {path} ({err}); rerun with --refit") from err
    return idata
