"""ROOT reading: ntuples -> Definitions -> Filter -> Weight -> per-event torch columns.

For every template of a configuration (region x sample x variation, see
:meth:`analysis.config.Config.templates`) this returns the events that pass the template's hard
``Filter`` as a set of per-event columns (the region's observable and the variables of its cuts)
and their weights, as torch tensors on the chosen device (float64 by default).

Reading is done once per (files, tree): all templates that read the same tree share one pass
over it, in chunks of ``step_size`` (uproot ``TTree.iterate``), so memory is bounded by one chunk
plus the selected float columns. Only the branches the expressions use are read.

Expressions (Definitions, Filter, Weight, Variable, cut variables) are in the language of
:mod:`analysis.expressions`: parsed and checked against its allowlist before any file is opened,
then interpreted over the awkward columns of each chunk (never ``eval``'d). Definitions are
evaluated lazily, only those an expression of the group uses, in config order.

Results are cached on disk (``.npz`` per (files, tree)), keyed by the content of the input
files and everything else that determines them, verified on load, best effort: see
:mod:`analysis.cache`.
"""

from __future__ import annotations

import difflib
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import awkward as ak
import numpy as np
import torch
import uproot

from analysis.cache import ColumnCache
from analysis.cache import default_cache_dir as default_cache_dir  # re-exported
from analysis.config import Config, Definition, Template
from analysis.errors import (
    AnalysisError,
    ConfigError,
    DataError,
    InputFileError,
    MissingObjectError,
)
from analysis.expressions import (
    MAX_ELEMENTS,
    Expression,
    ExpressionError,
    evaluate,
    parse,
    record_fields,
)
from analysis.progress import progress_bar

log = logging.getLogger(__name__)

TemplateKey = tuple[str, str, str]  # (region, sample, variation)
#: most bytes the Definitions of one chunk may hold together (each value is also bounded by
#: :data:`analysis.expressions.MAX_ELEMENTS`): a chain of Definitions cannot add up to a bomb
DEFINITIONS_BUDGET = 2 * 8 * MAX_ELEMENTS


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
    fields = analysis_fields(config)  # record fields, from every expression of the analysis
    cache = ColumnCache(cache_dir)  # one per call: file digests, one warning on a failed write
    bar = progress_bar(len(groups), "reading", enabled=progress, unit="tree")
    try:
        for (paths, tree), members in groups.items():
            bar.set_postfix_str(_where(paths, tree), refresh=False)
            requests = list(
                dict.fromkeys(
                    _Request(t.filter, t.weight, template_expressions(t)) for t in members
                )
            )
            arrays = _read_group(
                config, fields, paths, tree, requests, members[0], cache, step_size
            )
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
def analysis_fields(config: Config) -> frozenset[str]:
    """Record fields that expressions of ``config`` may read after a dot (dict-literal keys)."""
    sources = [d.expression for d in config.definitions]
    for template in config.templates():
        sources += [e for e in (template.filter, template.weight) if e is not None]
        sources += template_expressions(template)
    return record_fields(sources)


def _needed_definitions(
    definitions: tuple[Definition, ...], names: set[str], fields: frozenset[str]
) -> list[tuple[Definition, Expression]]:
    """The Definitions that ``names`` use, transitively, in config order, parsed."""
    parsed = {
        d.name: (d, parse(d.expression, f"Definitions[{i}] '{d.name}'", fields))
        for i, d in enumerate(definitions)
    }
    needed: set[str] = set()
    stack = [n for n in names if n in parsed]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(n for n in parsed[name][1].names if n in parsed and n not in needed)
    return [(d, expression) for d, expression in parsed.values() if d.name in needed]


def _where(paths: tuple[pathlib.Path, ...], tree: str) -> str:
    return f"{','.join(str(p) for p in paths)}:{tree}"


# ----------------------------------------------------------------------------- reading
def _read_group(
    config: Config,
    fields: frozenset[str],
    paths: tuple[pathlib.Path, ...],
    tree: str,
    requests: list[_Request],
    example: Template,
    cache: ColumnCache,
    step_size: int | str,
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Read one (files, tree) for all its requests: [(columns, weight)] in request order."""
    for path in paths:
        if not path.is_file():
            raise InputFileError(
                f"{path}: file not found (sample '{example.sample.name}', "
                f"InputPath '{config.general.input_path}')"
            )
    # parse everything first: a bad expression fails before any file is opened
    sample = example.sample.name
    parsed: list[tuple[Expression | None, Expression | None, list[Expression]]] = []
    names: set[str] = set()
    for request in requests:
        entry_filter = entry_weight = None
        if request.filter is not None:
            entry_filter = parse(request.filter, f"Filter of {sample!r}", fields)
        if request.weight is not None:
            entry_weight = parse(request.weight, f"Weight of {sample!r}", fields)
        exprs = [parse(e, f"Variable {e!r}", fields) for e in request.expressions]
        for expression in [entry_filter, entry_weight, *exprs]:
            names |= expression.names if expression is not None else set()
        parsed.append((entry_filter, entry_weight, exprs))
    definitions = _needed_definitions(config.definitions, names, fields)
    for _, expression in definitions:
        names |= expression.names
    names -= {d.name for d in config.definitions}

    key = cache.key(
        paths,
        tree,
        [(d.name, d.expression) for d, _ in definitions],
        [(r.filter, r.weight, r.expressions) for r in requests],
    )
    cached = cache.load(key)
    if cached is not None:
        log.debug("cache hit for %s", _where(paths, tree))
        return cached

    out: list[tuple[list[dict[str, np.ndarray]], list[np.ndarray]]] = [([], []) for _ in requests]
    nan_counts: dict[str, int] = {}
    notes: dict[str, None] = {}  # warnings raised while evaluating, for the error message
    for path in paths:
        ttree = _open_tree(path, tree, example)
        branches = set(ttree.keys())
        for name in sorted(names - branches):
            raise MissingObjectError(
                f"{path}:{tree}: no branch '{name}'{_suggest(name, branches)} "
                f"(used by {_user_of(name, config, fields, requests)})"
            )
        try:
            chunks = ttree.iterate(filter_name=sorted(names), step_size=step_size, library="ak")
            for chunk in chunks:
                columns: dict[str, object] = {}
                for field in chunk.fields:
                    columns[field] = chunk[field]
                    _count_nan(field, chunk[field], nan_counts)
                where = f"sample '{sample}' ({path}:{tree})"
                held = 0  # bytes the Definitions of this chunk hold, against a memory bomb
                for definition, expression in definitions:
                    value = _evaluate_definition(
                        definition, expression, columns, config, where, notes
                    )
                    held += getattr(value, "nbytes", 8)
                    if held > DEFINITIONS_BUDGET:
                        raise DataError(
                            f"Definitions up to '{definition.name}' hold {held / 2**30:.3g} GiB "
                            f"for one chunk of {where}; expected at most "
                            f"{DEFINITIONS_BUDGET / 2**30:.3g} GiB"
                        )
                    columns[definition.name] = value
                n_events = len(chunk)
                for (entry_filter, entry_weight, exprs), (cols, weights) in zip(
                    parsed, out, strict=True
                ):
                    mask = _per_event(entry_filter, columns, n_events, "Filter", bool, where, notes)
                    weight = _per_event(
                        entry_weight, columns, n_events, "Weight", float, where, notes
                    )
                    cols.append(
                        {
                            e.source: _per_event(
                                e, columns, n_events, "Variable", float, where, notes
                            )[mask]
                            for e in exprs
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
        keys = cols[0].keys() if cols else ()
        merged = {e: np.concatenate([c[e] for c in cols]) for e in keys}
        weight = np.concatenate(weights) if weights else np.zeros(0)
        for expr, values in list(merged.items()) + [("Weight", weight)]:
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                raise DataError(
                    f"{_where(paths, tree)}: {expr!r} is not finite for {bad} selected event(s)"
                    f"{_noted(notes)}"
                )
        result.append((merged, weight))
    cache.store(key, result)
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


def _user_of(name: str, config: Config, fields: frozenset[str], requests: list[_Request]) -> str:
    """Which expression uses ``name``, for the missing-branch message."""
    for definition in config.definitions:
        if name in parse(definition.expression, definition.name, fields).names:
            return f"Definition '{definition.name}'"
    for request in requests:
        for label, expr in [("Filter", request.filter), ("Weight", request.weight)] + [
            ("Variable", e) for e in request.expressions
        ]:
            if expr is not None and name in parse(expr, label, fields).names:
                return f"{label} {expr!r}"
    return "an expression"


def _count_nan(name: str, column: ak.Array, counts: dict[str, int]) -> None:
    flat = ak.flatten(column, axis=None)
    if np.issubdtype(np.asarray(flat).dtype, np.floating):
        counts[name] = counts.get(name, 0) + int(np.count_nonzero(np.isnan(np.asarray(flat))))


def _noted(notes: Mapping[str, None]) -> str:
    """The warnings raised while evaluating, as a suffix of a one-line error message."""
    return f" (while evaluating: {'; '.join(notes)})" if notes else ""


def _evaluate(
    expression: Expression, columns: Mapping[str, object], notes: dict[str, None], label: str
) -> object:
    """Evaluate ``expression``; remember its warnings in ``notes`` (labelled)."""
    value, warned = evaluate(expression, columns)
    notes.update((f"{label}: {w}", None) for w in warned)
    return value


def _evaluate_definition(
    definition: Definition,
    expression: Expression,
    columns: Mapping[str, object],
    config: Config,
    where: str,
    notes: dict[str, None],
) -> object:
    try:
        return _evaluate(expression, columns, notes, f"Definition '{definition.name}'")
    except ExpressionError as err:
        index = config.definitions.index(definition)
        raise DataError(
            f"Definitions[{index}] '{definition.name}' = {definition.expression!r} failed on "
            f"{where}: {err}{_noted(notes)}"
        ) from None


def _per_event(
    expression: Expression | None,
    columns: Mapping[str, object],
    n_events: int,
    role: str,
    kind: type,
    where: str,
    notes: dict[str, None],
) -> np.ndarray:
    """Evaluate an expression to one value per event (a constant is broadcast)."""
    if expression is None:
        return np.ones(n_events, dtype=bool if kind is bool else np.float64)
    expr = expression.source
    try:
        value = _evaluate(expression, columns, notes, f"{role} {expr!r}")
    except ExpressionError as err:
        raise DataError(f"{role} {expr!r} failed on {where}: {err}{_noted(notes)}") from None
    if isinstance(value, ak.Array | ak.Record) and ak.fields(value):
        raise ConfigError(
            f"{role} {expr!r} gives records with fields {', '.join(ak.fields(value))}; expected "
            f"one number per event, e.g. {expr}.pt"
        )
    if isinstance(value, ak.Array):
        if value.ndim != 1:
            raise ConfigError(
                f"{role} {expr!r} has {value.ndim} dimensions (per-object values); expected one "
                f"value per event, e.g. {expr}[:, 0] or ak.max({expr}, axis=1)"
            )
        if ak.any(ak.is_none(value, axis=0)):
            raise DataError(f"{role} {expr!r} is missing (None) for some events; use ak.fill_none")
        try:
            value = ak.to_numpy(value)
        except (TypeError, ValueError) as err:
            raise DataError(f"{role} {expr!r} on {where} is not a flat array: {err}") from None
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
