"""ROOT reading: ntuples -> Filter -> Definitions -> Weight -> per-event torch columns.

For every template of a configuration (region x sample x variation, see
:meth:`analysis.config.Config.templates`) this returns the events that pass the template's hard
``Filter`` as a set of per-event columns (the region's observable and the variables of its cuts)
and their weights, as torch tensors on the chosen device (float64 by default).

Reading is done once per (files, tree): all templates that read the same tree share one pass
over it, in chunks of ``step_size`` (uproot ``TTree.iterate``), so memory is bounded by one chunk
plus the selected float columns. Only the branches the expressions use are read. A sample's
files are its ``SamplePath`` list with wildcards expanded (:func:`analysis.files.expand_paths`).

Expressions (Definitions, Filter, Weight, Variable, cut variables) are in the language of
:mod:`analysis.expressions`: parsed and checked against its allowlist before any file is opened,
then interpreted over the awkward columns of each chunk (never ``eval``'d). The Definitions of a
sample are the global ones with the sample's own replacing or adding to them
(:meth:`analysis.config.Config.definitions_for`); only those an expression uses are evaluated,
each after the Definitions it reads (:func:`analysis.expressions.definition_order`).

**Filter first** (RDataFrame's ``Filter`` before ``Define``, coffea's masks before building
objects): the Filter and the Definitions it reads are evaluated on all events of a chunk; every
other Definition, the Weight and the Variables only on the events that pass. So with
``Filter: ak.num(Muon_pt) >= 2`` a Definition ``Muon_pt[:, 1]`` needs no ``pad_none``. An
event-wise expression has the same values either way; only reductions across events (``np.sum``
without ``axis``) would see fewer events, and they are chunk-dependent anyway.

:func:`check_inputs` (``diffana validate --data``) runs the same steps on the first entries of
every file, filling nothing, and lists every problem instead of stopping at the first.

Results are cached on disk (``.npz`` per (files, tree)), keyed by the content of the input
files and everything else that determines them, verified on load, best effort: see
:mod:`analysis.cache`.
"""

from __future__ import annotations

import difflib
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    definition_order,
    evaluate,
    parse,
    record_fields,
)
from analysis.files import is_pattern
from analysis.progress import progress_bar

log = logging.getLogger(__name__)

TemplateKey = tuple[str, str, str]  # (region, sample, variation)
#: most bytes the Definitions of one chunk may hold together (each value is also bounded by
#: :data:`analysis.expressions.MAX_ELEMENTS`): a chain of Definitions cannot add up to a bomb
DEFINITIONS_BUDGET = 2 * 8 * MAX_ELEMENTS
#: entries per file that :func:`check_inputs` evaluates the expressions on
CHECK_ENTRIES = 1000


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
class InputCheck:
    """What :func:`check_inputs` found: ``problems`` (one-line messages, empty when the inputs
    are usable), and how much it looked at: ``files`` opened, ``trees`` (file, tree) checked,
    ``templates`` checked and ``entries`` evaluated (the first ``entries_per_file`` of each)."""

    problems: tuple[str, ...]
    files: int
    trees: int
    templates: int
    entries: int
    entries_per_file: int

    def to_dict(self) -> dict[str, Any]:
        """``{"valid": bool, "files", "trees", "templates", "entries", "entries_per_file"}``,
        plus ``"problems"`` when there are any."""
        out: dict[str, Any] = {
            "valid": not self.problems,
            "files": self.files,
            "trees": self.trees,
            "templates": self.templates,
            "entries": self.entries,
            "entries_per_file": self.entries_per_file,
        }
        if self.problems:
            out["problems"] = list(self.problems)
        return out


@dataclass(frozen=True)
class _Request:
    """What one template needs from a tree: the Definitions in effect for its sample, a
    selection, a weight and some expressions."""

    definitions: tuple[Definition, ...]
    filter: str | None
    weight: str | None
    expressions: tuple[str, ...]


@dataclass(frozen=True)
class Partition:
    """Entries ``[start, stop)`` of ``tree`` in the file ``path``: the unit of work of a
    distributed read (:mod:`analysis.dask_histograms`), as uproot's ``entry_start`` and
    ``entry_stop``."""

    path: pathlib.Path
    tree: str
    start: int
    stop: int


def split_entries(path: pathlib.Path, tree: str, entries: int, parts: int) -> list[Partition]:
    """The ``entries`` of ``tree`` in ``path`` as ``parts`` consecutive ranges
    ``[i n // parts, (i + 1) n // parts)``, whose lengths differ by at most one."""
    bounds = [i * entries // parts for i in range(parts + 1)]
    return [Partition(path, tree, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def tree_entries(config: Config, path: pathlib.Path, example: Template) -> int:
    """The number of entries of ``example``'s tree in ``path``, with the reader's one-line
    errors for a missing file or tree (naming ``example``'s sample and InputPath)."""
    _check_exists(path, example, config)
    return int(_open_tree(path, example.tree, example).num_entries)


def template_key(template: Template) -> TemplateKey:
    return (template.region.name, template.sample.name, template.variation)


def template_expressions(template: Template) -> tuple[str, ...]:
    """The per-event expressions a template's histogram and cuts need, observable first."""
    exprs = [template.variable] + [cut.variable for cut in template.region.cuts]
    return tuple(dict.fromkeys(exprs))


def _request(config: Config, template: Template) -> _Request:
    return _Request(
        config.definitions_for(template.sample),
        template.filter,
        template.weight,
        template_expressions(template),
    )


def _groups(
    templates: Iterable[Template],
) -> dict[tuple[tuple[pathlib.Path, ...], str], list[Template]]:
    """Templates by the (files, tree) they read, in order."""
    groups: dict[tuple[tuple[pathlib.Path, ...], str], list[Template]] = {}
    for template in templates:
        groups.setdefault((template.paths, template.tree), []).append(template)
    return groups


def read_events(
    config: Config,
    templates: Iterable[Template] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    cache_dir: str | os.PathLike[str] | None = None,
    step_size: int | str = "64 MB",
    progress: bool = True,
    partition: Partition | None = None,
) -> dict[TemplateKey, Events]:
    """Read the events of ``templates`` (default: all of ``config.templates()``).

    With ``partition``, only its entries are read, for the templates that read its file and
    tree (the others are left out), and a template may have no events (its other partitions
    may); the column cache keys the entry range too.

    Each (files, tree) is read once for all the templates that use it; ``progress`` shows a bar
    over them on a terminal (:func:`analysis.progress.progress_bar`).

    Returns ``{(region, sample, variation): Events}``. Raises :class:`InputFileError` for a
    missing or unreadable file (or a wildcard that matches none), :class:`MissingObjectError`
    for a missing tree or branch, :class:`ConfigError` for an expression that is not allowed or
    not per-event, and :class:`DataError` for NaN values, a failing Definition or an empty
    selection.
    """
    if config.general.input_type == "histogram":
        from analysis.histogram_inputs import require_events  # it imports this module

        require_events(config, "reading events")
    templates = list(config.templates() if templates is None else templates)
    groups = _groups(templates)
    result: dict[TemplateKey, Events] = {}
    fields = analysis_fields(config)  # record fields, from every expression of the analysis
    cache = ColumnCache(cache_dir)  # one per call: file digests, one warning on a failed write
    bar = progress_bar(len(groups), "reading", enabled=progress, unit="tree")
    try:
        for (paths, tree), members in groups.items():
            entries = None
            if partition is not None:
                if partition.tree != tree or partition.path not in paths:
                    bar.update(1)
                    continue
                paths, entries = (partition.path,), (partition.start, partition.stop)
            bar.set_postfix_str(_where(paths, tree), refresh=False)
            samples = {_request(config, t): t.sample.name for t in reversed(members)}
            requests = list(dict.fromkeys(_request(config, t) for t in members))
            plan = _plan(config, fields, requests, samples)
            arrays = _read_group(config, paths, tree, plan, members[0], cache, step_size, entries)
            for template in members:
                columns, weight = arrays[requests.index(_request(config, template))]
                if weight.shape[0] == 0 and partition is None:
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
    sources += [d.expression for sample in config.samples for d in sample.definitions]
    for template in config.templates():
        sources += [e for e in (template.filter, template.weight) if e is not None]
        sources += template_expressions(template)
    return record_fields(sources)


@dataclass(frozen=True)
class _Step:
    """A parsed Definition and where it is in the configuration (``Definitions[2]``,
    ``Samples[1].Definitions[0]``)."""

    definition: Definition
    expression: Expression
    location: str

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def branch(self) -> str | None:
        """The branch the Definition reads under its own name (``x = x * 1.01``), or None."""
        return self.name if self.name in self.expression.names else None


@dataclass
class _Selection:
    """Requests with one set of Definitions and one Filter: the Filter and the Definitions it
    reads (``before``) are evaluated on all events; the other Definitions the requests read
    (``after``), their Weights and Variables on the events that pass."""

    definitions: tuple[Definition, ...]
    sample: str
    filter: Expression | None
    before: list[_Step]
    after: list[_Step] = field(default_factory=list)
    #: (index of the request, its Weight, its Variables)
    requests: list[tuple[int, Expression | None, list[Expression]]] = field(default_factory=list)


@dataclass
class _Plan:
    """Everything a (files, tree) read evaluates, parsed, for its requests in order."""

    requests: list[_Request]
    selections: list[_Selection]
    #: per request: the branches it reads, the Definitions it uses (evaluation order) and
    #: its other expressions with their role (Filter, Weight, Variable)
    branches: list[frozenset[str]]
    steps: list[list[_Step]]
    expressions: list[list[tuple[str, Expression]]]

    @property
    def all_branches(self) -> frozenset[str]:
        return frozenset().union(*self.branches)


def _definition_steps(
    config: Config, definitions: tuple[Definition, ...], fields: frozenset[str]
) -> dict[str, _Step]:
    """``definitions`` parsed, by name, in evaluation order (each after those it reads)."""
    locations = {id(d): f"Definitions[{i}]" for i, d in enumerate(config.definitions)}
    for i, sample in enumerate(config.samples):
        locations |= {
            id(d): f"Samples[{i}].Definitions[{j}]" for j, d in enumerate(sample.definitions)
        }
    steps = {}
    for d in definitions:
        location = locations.get(id(d), "Definitions")
        steps[d.name] = _Step(d, parse(d.expression, f"{location} '{d.name}'", fields), location)
    order = definition_order({n: s.expression.names for n, s in steps.items()}, config.source)
    return {name: steps[name] for name in order}


def _needed(steps: Mapping[str, _Step], names: Iterable[str]) -> list[_Step]:
    """The Definitions of ``steps`` that ``names`` read, transitively, in evaluation order."""
    needed: set[str] = set()
    stack = [n for n in names if n in steps]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(n for n in steps[name].expression.names if n in steps and n not in needed)
    return [step for name, step in steps.items() if name in needed]


def _plan(
    config: Config,
    fields: frozenset[str],
    requests: list[_Request],
    samples: Mapping[_Request, str],
) -> _Plan:
    """Parse everything ``requests`` evaluate (a bad expression fails before a file is opened)
    and group the requests into :class:`_Selection` s."""
    by_definitions: dict[tuple[Definition, ...], dict[str, _Step]] = {}
    selections: dict[tuple[tuple[Definition, ...], str | None], _Selection] = {}
    branches: list[frozenset[str]] = []
    used: list[list[_Step]] = []
    roles: list[list[tuple[str, Expression]]] = []
    for index, request in enumerate(requests):
        sample = samples.get(request, "?")
        if request.definitions not in by_definitions:
            by_definitions[request.definitions] = _definition_steps(
                config, request.definitions, fields
            )
        steps = by_definitions[request.definitions]
        entry_filter = entry_weight = None
        if request.filter is not None:
            entry_filter = parse(request.filter, f"Filter of {sample!r}", fields)
        if request.weight is not None:
            entry_weight = parse(request.weight, f"Weight of {sample!r}", fields)
        exprs = [parse(e, f"Variable {e!r}", fields) for e in request.expressions]
        key = (request.definitions, request.filter)
        if key not in selections:
            before = _needed(steps, entry_filter.names if entry_filter is not None else ())
            selections[key] = _Selection(request.definitions, sample, entry_filter, before)
        selection = selections[key]
        selection.requests.append((index, entry_weight, exprs))
        reads = set().union(*(e.names for e in [entry_weight, *exprs] if e is not None))
        selection.after = _needed(steps, reads | {s.name for s in selection.after})
        needed = _needed(steps, reads | (entry_filter.names if entry_filter else set()))
        names = set().union(
            *(e.names for e in [entry_filter, entry_weight, *exprs] if e is not None),
            *(s.expression.names for s in needed),
        )
        branches.append(
            frozenset(names - set(steps)) | {s.branch for s in needed if s.branch is not None}
        )
        used.append(needed)
        roles.append(
            [("Filter", e) for e in [entry_filter] if e is not None]
            + [("Weight", e) for e in [entry_weight] if e is not None]
            + [("Variable", e) for e in exprs]
        )
    return _Plan(requests, list(selections.values()), branches, used, roles)


def _where(paths: tuple[pathlib.Path, ...], tree: str) -> str:
    return f"{','.join(str(p) for p in paths)}:{tree}"


# ----------------------------------------------------------------------------- reading
Columns = list[tuple[dict[str, np.ndarray], np.ndarray]]


def _check_exists(path: pathlib.Path, example: Template, config: Config) -> None:
    if path.is_file():
        return
    if is_pattern(path):
        raise InputFileError(
            f"{path}: no file matches the wildcard pattern (sample '{example.sample.name}', "
            f"InputPath '{config.general.input_path}')"
        )
    raise InputFileError(
        f"{path}: file not found (sample '{example.sample.name}', "
        f"InputPath '{config.general.input_path}')"
    )


def _read_group(
    config: Config,
    paths: tuple[pathlib.Path, ...],
    tree: str,
    plan: _Plan,
    example: Template,
    cache: ColumnCache,
    step_size: int | str,
    entries: tuple[int, int] | None = None,
) -> Columns:
    """Read one (files, tree) for all its requests: [(columns, weight)] in request order;
    only the ``entries`` ``(start, stop)`` of each file when given."""
    for path in paths:
        _check_exists(path, example, config)
    names = plan.all_branches
    key = cache.key(
        paths,
        tree if entries is None else f"{tree}[{entries[0]}:{entries[1]}]",
        [
            (
                [(s.name, s.definition.expression) for s in steps],
                request.filter,
                request.weight,
                request.expressions,
            )
            for request, steps in zip(plan.requests, plan.steps, strict=True)
        ],
    )
    cached = cache.load(key)
    if cached is not None:
        log.debug("cache hit for %s", _where(paths, tree))
        return cached

    out: list[tuple[list[dict[str, np.ndarray]], list[np.ndarray]]] = [
        ([], []) for _ in plan.requests
    ]
    nan_counts: dict[str, int] = {}
    notes: dict[str, None] = {}  # warnings raised while evaluating, for the error message
    for path in paths:
        ttree = _open_tree(path, tree, example)
        available = set(ttree.keys())
        for name in sorted(names - available):
            raise MissingObjectError(
                f"{path}:{tree}: no branch '{name}'{_suggest(name, available)} "
                f"(used by {_user_of(name, plan)})"
            )
        try:
            start, stop = entries if entries is not None else (None, None)
            chunks = ttree.iterate(
                filter_name=sorted(names),
                step_size=step_size,
                library="ak",
                entry_start=start,
                entry_stop=stop,
            )
            for chunk in chunks:
                columns = {f: chunk[f] for f in chunk.fields}
                for name, column in columns.items():
                    _count_nan(name, column, nan_counts)
                parts = _evaluate_chunk(plan, columns, len(chunk), f"{path}:{tree}", notes)
                for (cols, weights), (values, weight) in zip(out, parts, strict=True):
                    cols.append(values)
                    weights.append(weight)
        except AnalysisError:
            raise
        except Exception as err:  # uproot/zlib errors on truncated or corrupt files
            raise _corrupt(path, tree, err) from None
    for branch, count in nan_counts.items():
        if count:
            raise DataError(
                f"{_where(paths, tree)}: branch '{branch}' has {count} NaN value(s); "
                "expected finite numbers"
            )
    result = []
    for (cols, weights), request in zip(out, plan.requests, strict=True):
        merged = {
            e: np.concatenate([c[e] for c in cols]) if cols else np.zeros(0)
            for e in request.expressions
        }
        weight = np.concatenate(weights) if weights else np.zeros(0)
        _check_finite(merged, weight, _where(paths, tree), notes)
        result.append((merged, weight))
    cache.store(key, result)
    return result


def _corrupt(path: pathlib.Path, tree: str, err: Exception) -> DataError:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return DataError(
        f"{path}:{tree}: cannot read the tree; the file is truncated or corrupt "
        f"({type(err).__name__}: {message})"
    )


def _check_finite(
    columns: Mapping[str, np.ndarray], weight: np.ndarray, where: str, notes: Mapping[str, None]
) -> None:
    for expr, values in list(columns.items()) + [("Weight", weight)]:
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataError(
                f"{where}: {expr!r} is not finite for {bad} selected event(s){_noted(notes)}"
            )


class _Selected(Mapping[str, Any]):
    """The columns of ``base`` at the events ``mask`` selects, each masked when first read;
    Definitions evaluated on the selected events are added with :meth:`define`."""

    def __init__(self, base: Mapping[str, Any], mask: np.ndarray) -> None:
        self._base, self._mask, self._n = base, mask, len(mask)
        self._values: dict[str, Any] = {}

    def define(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            value = self._base[name]
            per_event = isinstance(value, ak.Array | np.ndarray) and value.ndim > 0
            self._values[name] = value[self._mask] if per_event and len(value) == self._n else value
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._base

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._base, *self._values]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self._base, *self._values]))


def _evaluate_chunk(
    plan: _Plan,
    branches: Mapping[str, Any],
    n_events: int,
    source: str,
    notes: dict[str, None],
) -> Columns:
    """The columns and weights of every request of ``plan`` for one chunk of ``n_events``
    events: per selection the Filter (with the Definitions it reads) on all events, then the
    other Definitions, the Weight and the Variables on the events that pass."""
    held = [0]  # bytes the Definitions of this chunk hold, against a memory bomb
    everything: dict[tuple[Definition, ...], dict[str, Any]] = {}  # per set of Definitions
    evaluated: dict[tuple[Definition, ...], set[str]] = {}  # Definitions in it, on all events

    def define(step: _Step, columns: Mapping[str, Any], where: str) -> Any:
        value = _evaluate_definition(step, columns, where, notes)
        held[0] += getattr(value, "nbytes", 8)
        if held[0] > DEFINITIONS_BUDGET:
            raise DataError(
                f"Definitions up to '{step.name}' hold {held[0] / 2**30:.3g} GiB "
                f"for one chunk of {where}; expected at most "
                f"{DEFINITIONS_BUDGET / 2**30:.3g} GiB"
            )
        return value

    masks = []
    for selection in plan.selections:
        where = f"sample '{selection.sample}' ({source})"
        table = everything.setdefault(selection.definitions, dict(branches))
        done = evaluated.setdefault(selection.definitions, set())
        for step in selection.before:
            if step.name not in done:
                table[step.name] = define(step, table, where)
                done.add(step.name)
        masks.append(_per_event(selection.filter, table, n_events, "Filter", bool, where, notes))

    out: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    for selection, mask in zip(plan.selections, masks, strict=True):
        where = f"sample '{selection.sample}' ({source})"
        table, done = everything[selection.definitions], evaluated[selection.definitions]
        columns: Mapping[str, Any] = table
        n_selected = n_events
        if selection.filter is not None:
            columns, n_selected = _Selected(table, mask), int(np.count_nonzero(mask))
        for step in selection.after:
            if step.name in done:
                continue
            value = define(step, columns, where)
            if isinstance(columns, _Selected):
                columns.define(step.name, value)
            else:  # no Filter: a Definition of all events, as those the Filters read
                table[step.name] = value
                done.add(step.name)
        for index, weight, exprs in selection.requests:
            values = {
                e.source: _per_event(e, columns, n_selected, "Variable", float, where, notes)
                for e in exprs
            }
            out[index] = (
                values,
                _per_event(weight, columns, n_selected, "Weight", float, where, notes),
            )
    return [out[i] for i in range(len(plan.requests))]


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


def _user_of(name: str, plan: _Plan, requests: Iterable[int] | None = None) -> str:
    """Which expression of ``plan`` (of its ``requests``, default all) reads the branch
    ``name``, for the missing-branch message."""
    indices = list(range(len(plan.requests)) if requests is None else requests)
    for i in indices:
        defined = {s.name for s in plan.steps[i]}
        for step in plan.steps[i]:
            if name in step.expression.names and (name not in defined or step.branch == name):
                return f"{step.location} '{step.name}'"
    for i in indices:
        for role, expression in plan.expressions[i]:
            if name in expression.names:
                return f"{role} {expression.source!r}"
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
    step: _Step, columns: Mapping[str, object], where: str, notes: dict[str, None]
) -> object:
    try:
        return _evaluate(step.expression, columns, notes, f"Definition '{step.name}'")
    except ExpressionError as err:
        raise DataError(
            f"{step.location} '{step.name}' = {step.definition.expression!r} failed on "
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
            f"one number per event, e.g. {expr}.pt ({where})"
        )
    if isinstance(value, ak.Array):
        if value.ndim != 1:
            raise ConfigError(
                f"{role} {expr!r} has {value.ndim} dimensions (per-object values); expected one "
                f"value per event, e.g. {expr}[:, 0] or ak.max({expr}, axis=1) ({where})"
            )
        if ak.any(ak.is_none(value, axis=0)):
            raise DataError(
                f"{role} {expr!r} is missing (None) for some events of {where}; use "
                "ak.fill_none, or a Filter that keeps only events where it exists"
            )
        try:
            value = ak.to_numpy(value)
        except (TypeError, ValueError) as err:
            raise DataError(f"{role} {expr!r} on {where} is not a flat array: {err}") from None
    array = np.asarray(value)
    if array.ndim == 0:
        array = np.full(n_events, array.item())
    if array.shape != (n_events,):
        raise ConfigError(
            f"{role} {expr!r} has shape {array.shape}; expected ({n_events},) ({where})"
        )
    if kind is bool:
        if array.dtype != bool:
            raise ConfigError(
                f"{role} {expr!r} gives {array.dtype} values; expected booleans ({where})"
            )
        return array
    return array.astype(np.float64)


# ----------------------------------------------------------------------------- checking
def check_inputs(config: Config, *, entries: int = CHECK_ENTRIES) -> InputCheck:
    """Check that ``config`` can read its inputs, without filling a histogram
    (``diffana validate --data``).

    Every template's files are opened (wildcards expanded) and its tree looked up; every branch
    an expression of the template reads must be in every file; then the template's Filter (with
    the Definitions it reads) is evaluated on the first ``entries`` entries of each file and its
    other Definitions, Weight and Variables on the entries that pass, as
    :func:`read_events` does, including the per-event checks (one number per event, no NaN in
    the branches read, finite values). Systematic variations that change the Tree, Weight,
    Filter, Variable or SamplePath are templates too. Every problem is collected, as the
    one-line message :func:`read_events` would raise (messages repeated by several templates
    once), rather than stopping at the first. An empty selection is not a problem here: the
    first entries need not be representative.
    """
    fields = analysis_fields(config)
    problems: dict[str, None] = {}
    files: set[pathlib.Path] = set()
    trees = checked = 0
    templates = list(config.templates())
    for (paths, tree), members in _groups(templates).items():
        samples = {_request(config, t): t.sample.name for t in reversed(members)}
        plans = []  # one per request, so that one failure hides no other
        for request in dict.fromkeys(_request(config, t) for t in members):
            try:
                plans.append(_plan(config, fields, [request], samples))
            except AnalysisError as err:
                problems[str(err)] = None
        together = _plan(config, fields, [p.requests[0] for p in plans], samples)
        for path in paths:
            try:
                _check_exists(path, members[0], config)
                ttree = _open_tree(path, tree, members[0])
            except AnalysisError as err:
                problems[str(err)] = None
                continue
            files.add(path)
            trees += 1
            available = set(ttree.keys())
            usable = []
            for plan in plans:
                missing = sorted(plan.all_branches - available)
                for name in missing:
                    problems[
                        f"{path}:{tree}: no branch '{name}'{_suggest(name, available)} "
                        f"(used by {_user_of(name, plan)})"
                    ] = None
                if not missing:
                    usable.append(plan)
            if not usable:
                continue
            names = frozenset().union(*(plan.all_branches for plan in usable))
            try:
                chunk = ttree.arrays(filter_name=sorted(names), entry_stop=entries, library="ak")
            except Exception as err:
                problems[str(_corrupt(path, tree, err))] = None
                continue
            columns = {f: chunk[f] for f in chunk.fields}
            checked += len(chunk)
            nan_counts: dict[str, int] = {}
            for name, column in columns.items():
                _count_nan(name, column, nan_counts)
            for name, count in nan_counts.items():
                if count:
                    problems[
                        f"{path}:{tree}: branch '{name}' has {count} NaN value(s) in its first "
                        f"{len(chunk)} entries; expected finite numbers"
                    ] = None
            # all requests at once (Definitions shared, as when reading); one by one only
            # when that fails, to find every problem
            source = f"{path}:{tree}"
            if len(usable) < len(plans) or not _evaluates(together, columns, len(chunk), source):
                for plan in usable:
                    try:
                        _evaluates(plan, columns, len(chunk), source)
                    except AnalysisError as err:
                        problems[str(err)] = None
    return InputCheck(
        problems=tuple(problems),
        files=len(files),
        trees=trees,
        templates=len(templates),
        entries=checked,
        entries_per_file=entries,
    )


def _evaluates(plan: _Plan, columns: Mapping[str, Any], n_events: int, source: str) -> bool:
    """Whether every request of ``plan`` evaluates on ``columns`` (one chunk of ``n_events``
    events of ``source``) to finite per-event columns and weights; raises the first problem
    when ``plan`` has one request, returns False on a problem otherwise."""
    notes: dict[str, None] = {}
    try:
        for values, weight in _evaluate_chunk(plan, columns, n_events, source, notes):
            _check_finite(values, weight, source, notes)
    except AnalysisError:
        if len(plan.requests) == 1:
            raise
        return False
    return True
