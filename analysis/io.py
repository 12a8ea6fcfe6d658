"""ROOT reading: ntuples -> Definitions -> Filter -> Weight -> per-event torch columns.

For every template of a configuration (region x sample x variation, see
:meth:`analysis.config.Config.templates`) this returns the events that pass the template's hard
``Filter`` as a set of per-event columns (the region's observable and the variables of its cuts)
and their weights, as torch tensors on the chosen device (float64 by default).

Reading is done once per (files, tree): all templates that read the same tree share one pass
over it, in chunks of ``step_size`` (uproot ``TTree.iterate``), so memory is bounded by one chunk
plus the selected float columns. Only the branches the expressions use are read.

Expressions (Definitions, Filter, Weight, Variable, cut variables) are Python expressions over
branch and Definition names, evaluated with awkward arrays in a namespace that holds only the
columns, the modules ``np``/``numpy``, ``ak``/``awkward`` and ``vector``, and ``abs``
(``np.abs``): no other builtins, and
no names or attributes that start with an underscore (so no ``__class__`` escapes).

Results are cached on disk (``.npz`` per (files, tree)), keyed by a hash of everything that
determines them: the resolved file paths with their size and modification time, the tree, the
Definitions used, and each template's Filter, Weight and expressions.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import awkward as ak
import numpy as np
import torch
import uproot
import vector

from analysis.config import RESERVED_NAMES, Config, Definition, Template
from analysis.errors import (
    AnalysisError,
    ConfigError,
    DataError,
    InputFileError,
    MissingObjectError,
)
from analysis.files import write_atomically
from analysis.progress import progress_bar

log = logging.getLogger(__name__)

#: bump when the cache layout or the meaning of cached arrays changes
CACHE_VERSION = 1
TemplateKey = tuple[str, str, str]  # (region, sample, variation)


@dataclass(frozen=True)
class Events:
    """The events of one template after its Filter.

    ``columns`` maps each expression (the region's Variable, each cut's Variable) to a tensor of
    shape ``(n_events,)``; ``weight`` has the same shape. All on one device, one dtype.
    ``variable`` names the column that is histogrammed.
    """

    variable: str
    columns: Mapping[str, torch.Tensor]
    weight: torch.Tensor

    @property
    def observable(self) -> torch.Tensor:
        """The histogrammed column, ``columns[variable]``."""
        return self.columns[self.variable]

    def __len__(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class _Request:
    """What one template needs from a tree: a selection, a weight and some expressions."""

    filter: str | None
    weight: str | None
    expressions: tuple[str, ...]


def template_key(template: Template) -> TemplateKey:
    return (template.region.name, template.sample.name, template.variation)


def template_expressions(template: Template) -> tuple[str, ...]:
    """The per-event expressions a template's histogram and cuts need, observable first."""
    exprs = [template.variable] + [cut.variable for cut in template.region.cuts]
    return tuple(dict.fromkeys(exprs))


def read_events(
    config: Config,
    templates: Iterable[Template] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    cache_dir: str | os.PathLike[str] | None = None,
    step_size: int | str = "64 MB",
    progress: bool = True,
) -> dict[TemplateKey, Events]:
    """Read the events of ``templates`` (default: all of ``config.templates()``).

    Each (files, tree) is read once for all the templates that use it; ``progress`` shows a bar
    over them on a terminal (:func:`analysis.progress.progress_bar`).

    Returns ``{(region, sample, variation): Events}``. Raises :class:`InputFileError` for a
    missing or unreadable file, :class:`MissingObjectError` for a missing tree or branch,
    :class:`ConfigError` for an expression that is not allowed or not per-event, and
    :class:`DataError` for NaN values, a failing Definition or an empty selection.
    """
    templates = list(config.templates() if templates is None else templates)
    groups: dict[tuple[tuple[pathlib.Path, ...], str], list[Template]] = {}
    for template in templates:
        groups.setdefault((template.paths, template.tree), []).append(template)

    result: dict[TemplateKey, Events] = {}
    bar = progress_bar(len(groups), "reading", enabled=progress, unit="tree")
    try:
        for (paths, tree), members in groups.items():
            bar.set_postfix_str(_where(paths, tree), refresh=False)
            requests = list(
                dict.fromkeys(
                    _Request(t.filter, t.weight, template_expressions(t)) for t in members
                )
            )
            arrays = _read_group(config, paths, tree, requests, members[0], cache_dir, step_size)
            for template in members:
                request = _Request(template.filter, template.weight, template_expressions(template))
                columns, weight = arrays[requests.index(request)]
                if weight.shape[0] == 0:
                    raise DataError(
                        f"{_where(paths, tree)}: {template.label} has no events after Filter "
                        f"{template.filter!r}"
                    )
                result[template_key(template)] = Events(
                    variable=template.variable,
                    columns={
                        k: torch.as_tensor(v).to(device=device, dtype=dtype)
                        for k, v in columns.items()
                    },
                    weight=torch.as_tensor(weight).to(device=device, dtype=dtype),
                )
            bar.update(1)
    finally:
        bar.close()
    return result


# ----------------------------------------------------------------------------- expressions
def compile_expression(expr: str, what: str) -> tuple[object, frozenset[str]]:
    """Compile ``expr`` for the restricted namespace; return the code and the names it uses."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{what}: {expr!r} is not a valid expression ({err.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ConfigError(
                f"{what}: {expr!r} uses attribute '{node.attr}'; "
                "names starting with '_' are not allowed"
            )
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ConfigError(
                f"{what}: {expr!r} uses name '{node.id}'; names starting with '_' are not allowed"
            )
    names = frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
    return compile(tree, "<expression>", "eval"), names


def _namespace() -> dict[str, object]:
    return {
        "__builtins__": {},
        "np": np,
        "numpy": np,
        "ak": ak,
        "awkward": ak,
        "vector": vector,
        "abs": np.abs,  # the one builtin physicists use in cuts; numpy's works on awkward arrays
    }


def _needed_definitions(
    definitions: tuple[Definition, ...], names: set[str]
) -> list[tuple[Definition, object]]:
    """The Definitions that ``names`` use, transitively, in config order, compiled."""
    compiled = {
        d.name: (d, *compile_expression(d.expression, f"Definitions[{i}] '{d.name}'"))
        for i, d in enumerate(definitions)
    }
    needed: set[str] = set()
    stack = [n for n in names if n in compiled]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(n for n in compiled[name][2] if n in compiled and n not in needed)
    return [(d, code) for d, code, _ in compiled.values() if d.name in needed]


def _where(paths: tuple[pathlib.Path, ...], tree: str) -> str:
    return f"{','.join(str(p) for p in paths)}:{tree}"


# ----------------------------------------------------------------------------- reading
def _read_group(
    config: Config,
    paths: tuple[pathlib.Path, ...],
    tree: str,
    requests: list[_Request],
    example: Template,
    cache_dir: str | os.PathLike[str] | None,
    step_size: int | str,
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Read one (files, tree) for all its requests: [(columns, weight)] in request order."""
    for path in paths:
        if not path.is_file():
            raise InputFileError(
                f"{path}: file not found (sample '{example.sample.name}', "
                f"InputPath '{config.general.input_path}')"
            )
    # compile everything first: a bad expression fails before any file is opened
    compiled: list[
        tuple[tuple[str, object] | None, tuple[str, object] | None, list[tuple[str, object]]]
    ] = []
    names: set[str] = set()
    for request in requests:
        entry_filter = entry_weight = None
        if request.filter is not None:
            code, used = compile_expression(request.filter, f"Filter of {example.sample.name!r}")
            entry_filter, names = (request.filter, code), names | used
        if request.weight is not None:
            code, used = compile_expression(request.weight, f"Weight of {example.sample.name!r}")
            entry_weight, names = (request.weight, code), names | used
        exprs = []
        for expr in request.expressions:
            code, used = compile_expression(expr, f"Variable {expr!r}")
            exprs.append((expr, code))
            names |= used
        compiled.append((entry_filter, entry_weight, exprs))
    definitions = _needed_definitions(config.definitions, names)
    for definition, _ in definitions:
        names |= compile_expression(definition.expression, definition.name)[1]
    names -= {d.name for d in config.definitions}
    names -= RESERVED_NAMES

    key = _cache_key(paths, tree, definitions, requests)
    cached = _cache_load(cache_dir, key, requests)
    if cached is not None:
        log.debug("cache hit for %s", _where(paths, tree))
        return cached

    out: list[tuple[list[dict[str, np.ndarray]], list[np.ndarray]]] = [([], []) for _ in requests]
    nan_counts: dict[str, int] = {}
    for path in paths:
        ttree = _open_tree(path, tree, example)
        branches = set(ttree.keys())
        for name in sorted(names - branches):
            raise MissingObjectError(
                f"{path}:{tree}: no branch '{name}'{_suggest(name, branches)} "
                f"(used by {_user_of(name, config, requests)})"
            )
        try:
            chunks = ttree.iterate(filter_name=sorted(names), step_size=step_size, library="ak")
            for chunk in chunks:
                namespace = _namespace()
                for field in chunk.fields:
                    column = chunk[field]
                    namespace[field] = column
                    _count_nan(field, column, nan_counts)
                for definition, code in definitions:
                    namespace[definition.name] = _evaluate_definition(
                        definition, code, namespace, config, example, path, tree
                    )
                n_events = len(chunk)
                where = f"sample '{example.sample.name}' ({path}:{tree})"
                for (entry_filter, entry_weight, exprs), (cols, weights) in zip(
                    compiled, out, strict=True
                ):
                    mask = _per_event(entry_filter, namespace, n_events, "Filter", bool, where)
                    weight = _per_event(entry_weight, namespace, n_events, "Weight", float, where)
                    cols.append(
                        {
                            expr: _per_event(
                                (expr, code), namespace, n_events, "Variable", float, where
                            )[mask]
                            for expr, code in exprs
                        }
                    )
                    weights.append(weight[mask])
        except AnalysisError:
            raise
        except Exception as err:  # uproot/zlib errors on truncated or corrupt files
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DataError(
                f"{path}:{tree}: cannot read the tree; the file is truncated or corrupt "
                f"({type(err).__name__}: {message})"
            ) from None
    for branch, count in nan_counts.items():
        if count:
            raise DataError(
                f"{_where(paths, tree)}: branch '{branch}' has {count} NaN value(s); "
                "expected finite numbers"
            )
    result = []
    for cols, weights in out:
        exprs = cols[0].keys() if cols else ()
        columns = {e: np.concatenate([c[e] for c in cols]) for e in exprs}
        weight = np.concatenate(weights) if weights else np.zeros(0)
        for expr, values in list(columns.items()) + [("Weight", weight)]:
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                raise DataError(
                    f"{_where(paths, tree)}: {expr!r} is not finite for {bad} selected event(s)"
                )
        result.append((columns, weight))
    _cache_store(cache_dir, key, result)
    return result


def _open_tree(path: pathlib.Path, tree: str, example: Template) -> uproot.TTree:
    try:
        file = uproot.open(path)
    except Exception as err:
        raise DataError(
            f"{path}: cannot be opened as a ROOT file; it is truncated or corrupt "
            f"({type(err).__name__})"
        ) from None
    try:
        obj = file[tree]
    except Exception:
        trees = sorted(file.keys(filter_classname="TTree", cycle=False))
        raise MissingObjectError(
            f"{path}: no tree '{tree}' (sample '{example.sample.name}'){_suggest(tree, trees)}; "
            f"trees in the file: {', '.join(trees) or 'none'}"
        ) from None
    if not isinstance(obj, uproot.TTree):
        raise MissingObjectError(f"{path}: '{tree}' is a {type(obj).__name__}, expected a TTree")
    return obj


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _user_of(name: str, config: Config, requests: list[_Request]) -> str:
    """Which expression uses ``name``, for the missing-branch message."""
    for definition in config.definitions:
        if name in compile_expression(definition.expression, definition.name)[1]:
            return f"Definition '{definition.name}'"
    for request in requests:
        for label, expr in [("Filter", request.filter), ("Weight", request.weight)] + [
            ("Variable", e) for e in request.expressions
        ]:
            if expr is not None and name in compile_expression(expr, label)[1]:
                return f"{label} {expr!r}"
    return "an expression"


def _count_nan(name: str, column: ak.Array, counts: dict[str, int]) -> None:
    flat = ak.flatten(column, axis=None)
    if np.issubdtype(np.asarray(flat).dtype, np.floating):
        counts[name] = counts.get(name, 0) + int(np.count_nonzero(np.isnan(np.asarray(flat))))


def _evaluate_definition(
    definition: Definition,
    code: object,
    namespace: dict[str, object],
    config: Config,
    example: Template,
    path: pathlib.Path,
    tree: str,
) -> object:
    try:
        return eval(code, namespace)  # noqa: S307 - restricted namespace, see module docstring
    except Exception as err:
        index = config.definitions.index(definition)
        raise DataError(
            f"Definitions[{index}] '{definition.name}' = {definition.expression!r} failed on "
            f"sample '{example.sample.name}' ({path}:{tree}): {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None


def _per_event(
    entry: tuple[str, object] | None,
    namespace: dict[str, object],
    n_events: int,
    role: str,
    kind: type,
    where: str,
) -> np.ndarray:
    """Evaluate an expression to one value per event (a constant is broadcast)."""
    if entry is None:
        return np.ones(n_events, dtype=bool if kind is bool else np.float64)
    expr, code = entry
    try:
        value = eval(code, namespace)  # noqa: S307 - restricted namespace
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"{role} {expr!r} failed on {where}: {type(err).__name__}: {message}"
        ) from None
    if isinstance(value, ak.Array):
        if value.ndim != 1:
            raise ConfigError(
                f"{role} {expr!r} has {value.ndim} dimensions (per-object values); expected one "
                f"value per event, e.g. {expr}[:, 0] or ak.max({expr}, axis=1)"
            )
        if ak.any(ak.is_none(value, axis=0)):
            raise DataError(f"{role} {expr!r} is missing (None) for some events; use ak.fill_none")
        value = ak.to_numpy(value)
    array = np.asarray(value)
    if array.ndim == 0:
        array = np.full(n_events, array.item())
    if array.shape != (n_events,):
        raise ConfigError(f"{role} {expr!r} has shape {array.shape}; expected ({n_events},)")
    if kind is bool:
        if array.dtype != bool:
            raise ConfigError(f"{role} {expr!r} gives {array.dtype} values; expected booleans")
        return array
    return array.astype(np.float64)


# ----------------------------------------------------------------------------- cache
def _cache_key(
    paths: tuple[pathlib.Path, ...],
    tree: str,
    definitions: list[tuple[Definition, object]],
    requests: list[_Request],
) -> str:
    files = []
    for path in paths:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "tree": tree,
        "definitions": [[d.name, d.expression] for d, _ in definitions],
        "requests": [[r.filter, r.weight, list(r.expressions)] for r in requests],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _cache_load(
    cache_dir: str | os.PathLike[str] | None, key: str, requests: list[_Request]
) -> list[tuple[dict[str, np.ndarray], np.ndarray]] | None:
    if cache_dir is None:
        return None
    path = pathlib.Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            return [
                (
                    {e: stored[f"r{i}_c{j}"] for j, e in enumerate(r.expressions)},
                    stored[f"r{i}_weight"],
                )
                for i, r in enumerate(requests)
            ]
    except Exception:  # a damaged cache entry is ignored and rewritten
        log.warning("ignoring unreadable cache file %s", path)
        return None


def _cache_store(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    result: list[tuple[dict[str, np.ndarray], np.ndarray]],
) -> None:
    if cache_dir is None:
        return
    directory = pathlib.Path(cache_dir)
    arrays = {}
    for i, (columns, weight) in enumerate(result):
        arrays[f"r{i}_weight"] = weight
        for j, values in enumerate(columns.values()):
            arrays[f"r{i}_c{j}"] = values
    write_atomically(directory / f"{key}.npz", lambda handle: np.savez(handle, **arrays))


def default_cache_dir() -> pathlib.Path:
    """``$DIFFANA_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffana``, else ``~/.cache/diffana``."""
    if "DIFFANA_CACHE_DIR" in os.environ:
        return pathlib.Path(os.environ["DIFFANA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "diffana"
