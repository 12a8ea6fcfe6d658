"""Analysis configuration: YAML -> JSON schema -> semantic checks -> frozen dataclasses.

The vocabulary is cabinetry's (``General``, ``Regions``, ``Samples``, ``Systematics``,
``NormFactors``; a cabinetry configuration loads unchanged, with ntuple inputs or, when no sample
has a ``Tree``, histogram inputs: :mod:`analysis.histogram_inputs`), extended by

- ``Definitions``: named derived columns, awkward/numpy/vector expressions evaluated in order
  (like RDataFrame's ``Define``);
- per-region ``Cuts``: ``Variable Direction Value`` with ``Bounds`` and ``Trainable``, boolean in
  hard evaluation and sigmoids in the differentiable pipeline;
- ``Optimization``: objective, steps, learning rate, bandwidth and temperature schedule, seed.

Validation happens in three layers, as in cabinetry's ``configuration.validate``: the JSON schema
in ``analysis/schemas/config.json`` (``additionalProperties: false`` everywhere, so a typo in a key
is caught), then checks a schema cannot express (unique names, exactly one data sample, references
to existing regions and samples, strictly increasing bin edges), then conversion into frozen
dataclasses. No code below this module reads the raw dictionary.

Before the schema, the file itself is checked: a key given twice in one mapping, YAML aliases
that expand to an unreasonably large document ("billion laughs"), and numbers that are NaN or
infinite (``.nan``, ``.inf``, ``1e999``) anywhere are refused. Names of regions, samples,
systematics and normfactors become parts of file names, so they must be safe file names
(:func:`file_name_problem`); cut names are only keys of ``cuts.json``.

Every error is a :class:`~analysis.errors.ConfigError` whose one-line message starts with the file
and the YAML path (``dimuon.yaml: Regions[0].Binning: ...``) and says what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, cast

import jsonschema
import yaml

from analysis.errors import ConfigError, InputFileError
from analysis.files import expand_paths

Side = Literal["Up", "Down"]
#: names that expressions see besides the columns; Definitions may not shadow them
RESERVED_NAMES = frozenset({"np", "numpy", "ak", "awkward", "vector", "abs"})


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Definition:
    """A named derived column: ``name = expression``.

    ``description``, ``unit`` and ``label`` are for humans and figures only (axis titles, see
    :func:`analysis.plotting.labels.variable_label`): the unit is ``unit``, else a unit in
    square brackets ending the description (``"... [GeV]"``), else none.
    """

    name: str
    expression: str
    description: str | None = None
    unit: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Cut:
    """Keep events with ``variable > value`` (direction ``">"``) or ``variable < value``."""

    name: str
    variable: str
    direction: Literal[">", "<"]
    value: float
    bounds: tuple[float, float]
    trainable: bool


@dataclass(frozen=True)
class Region:
    """A channel: the histogram of ``variable`` in ``binning`` after ``filter`` and ``cuts``.

    With histogram inputs (``General.input_type == "histogram"``) the histograms are read from
    ``region_path``; ``variable`` is then ``""`` unless given (a label only) and ``binning`` is
    ``()`` unless given (then the files' edges must equal it).
    """

    name: str
    variable: str
    binning: tuple[float, ...]
    filter: str | None
    cuts: tuple[Cut, ...]
    region_path: str | None
    type: Literal["Signal", "Control"] = "Signal"  # TRExFitter's Region Type


@dataclass(frozen=True)
class Sample:
    """A process (or the data) read from ``tree`` in the files given by ``sample_paths``.

    ``definitions``: the sample's own Definitions; one named as a global Definition replaces it
    for this sample, the others are added (:meth:`Config.definitions_for`). With histogram
    inputs ``tree`` is ``""`` and ``sample_paths`` holds at most one path.
    """

    name: str
    tree: str
    sample_paths: tuple[str, ...]
    weight: str | None
    filter: str | None
    data: bool
    disable_staterror: bool
    regions: tuple[str, ...] | None
    definitions: tuple[Definition, ...] = ()


@dataclass(frozen=True)
class TemplateOverrides:
    """One side (Up or Down) of a systematic: the settings it changes relative to nominal."""

    tree: str | None = None
    weight: str | None = None
    variable: str | None = None
    filter: str | None = None
    region_path: str | None = None
    sample_paths: tuple[str, ...] | None = None
    normalization: float | None = None
    symmetrize: bool = False
    variation_path: str | None = None  # histogram inputs: {VariationPath} override


@dataclass(frozen=True)
class Systematic:
    """A systematic uncertainty of type ``Normalization`` or ``NormPlusShape``."""

    name: str
    type: Literal["Normalization", "NormPlusShape"]
    up: TemplateOverrides
    down: TemplateOverrides
    regions: tuple[str, ...] | None
    samples: tuple[str, ...] | None
    modifier_name: str

    def side(self, side: Side) -> TemplateOverrides:
        return self.up if side == "Up" else self.down


@dataclass(frozen=True)
class NormFactor:
    """A free normalisation factor (pyhf ``normfactor``)."""

    name: str
    regions: tuple[str, ...] | None
    samples: tuple[str, ...] | None
    nominal: float | None
    bounds: tuple[float, float] | None


@dataclass(frozen=True)
class Temperature:
    """Cut temperature schedule, in units of each cut variable's spread."""

    initial: float = 0.5
    final: float = 0.02
    schedule: Literal["exponential", "linear", "constant"] = "exponential"


@dataclass(frozen=True)
class Optimization:
    """Settings of the gradient-based cut optimization."""

    objective: str = "discovery_significance"
    steps: int = 100
    learning_rate: float = 0.05
    bandwidth: float = 0.36
    bandwidth_levels: int = 12
    temperature: Temperature = Temperature()
    evaluate_every: int = 10
    checkpoint_every: int = 25
    seed: int = 0
    min_effective_events: float = 10.0


@dataclass(frozen=True)
class General:
    measurement: str
    poi: str | None
    input_path: str
    fixed: Mapping[str, float]
    yield_floor: float = 1e-6
    #: histogram inputs: the nominal {VariationPath} (cabinetry's default: "")
    variation_path: str = ""
    #: "histogram" when no sample has a Tree (cabinetry's ``_input_is_ntuple``; read by
    #: :mod:`analysis.histogram_inputs`), else "ntuple"
    input_type: Literal["ntuple", "histogram"] = "ntuple"
    #: figure labels (mplhep's experiment label): integrated luminosity in fb^-1,
    #: centre-of-mass energy in TeV, experiment name and the text after it
    luminosity: float | None = None
    energy: float | None = None
    experiment: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Template:
    """Everything that determines one histogram: which events, which weight, which variable.

    ``variation`` is ``"nominal"`` or ``"<Systematic>_Up"`` / ``"<Systematic>_Down"``.
    """

    region: Region
    sample: Sample
    variation: str
    paths: tuple[pathlib.Path, ...]
    tree: str
    filter: str | None
    weight: str | None
    variable: str

    @property
    def label(self) -> str:
        """Human-readable name for messages: ``sample 'X' in region 'Y' (variation)``."""
        return f"sample '{self.sample.name}' in region '{self.region.name}' ({self.variation})"


@dataclass(frozen=True)
class Config:
    """A validated analysis configuration."""

    source: str
    general: General
    definitions: tuple[Definition, ...]
    regions: tuple[Region, ...]
    samples: tuple[Sample, ...]
    systematics: tuple[Systematic, ...]
    norm_factors: tuple[NormFactor, ...]
    optimization: Optimization

    @property
    def data_sample(self) -> Sample:
        return next(s for s in self.samples if s.data)

    @property
    def cuts(self) -> tuple[Cut, ...]:
        """Every distinct cut, in config order: a cut whose Name appears in several regions
        (one shared threshold, see :func:`_check_shared_cut`) once, where it first appears."""
        distinct: dict[str, Cut] = {}
        for region in self.regions:
            for cut in region.cuts:
                distinct.setdefault(cut.name, cut)
        return tuple(distinct.values())

    def cut_values(self) -> dict[str, float]:
        """Cut name -> threshold (the format of ``cuts.json``)."""
        return {cut.name: cut.value for cut in self.cuts}

    def with_cut_values(self, values: Mapping[str, float], source: str = "cuts") -> Config:
        """A copy with cut thresholds replaced by ``values`` (cut name -> value).

        Raises ConfigError for an unknown cut name, a value that is not a finite number
        (booleans are not numbers here, although Python counts ``True`` as 1) or a value outside
        the cut's Bounds.
        """
        known = {cut.name: cut for cut in self.cuts}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown cut {name!r}{_suggest(name, known)}")
            low, high = known[name].bounds
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(
                    f"{source}: cut {name!r} = {value!r} is not a finite number; expected a "
                    f"number within its Bounds [{low}, {high}]"
                )
            if not low <= value <= high:
                raise ConfigError(
                    f"{source}: cut {name!r} = {value!r} is outside its Bounds [{low}, {high}]"
                )
        regions = tuple(
            dataclasses.replace(
                region,
                cuts=tuple(
                    dataclasses.replace(cut, value=float(values.get(cut.name, cut.value)))
                    for cut in region.cuts
                ),
            )
            for region in self.regions
        )
        return dataclasses.replace(self, regions=regions)

    def definitions_for(self, sample: Sample) -> tuple[Definition, ...]:
        """The Definitions in effect for ``sample``: the global ones, each replaced by the
        sample's Definition of the same name where it has one, then the sample's others."""
        own = {d.name: d for d in sample.definitions}
        merged = tuple(own.pop(d.name, d) for d in self.definitions)
        return merged + tuple(own.values())

    def samples_in(self, region: Region, *, data: bool = False) -> tuple[Sample, ...]:
        """The prediction samples in ``region`` (or only the data sample, with ``data=True``)."""
        return tuple(
            s for s in self.samples if s.data == data and _contains(s.regions, region.name)
        )

    def systematics_for(self, region: Region, sample: Sample) -> tuple[Systematic, ...]:
        """Systematics acting on ``sample`` in ``region``, in config order."""
        return tuple(
            syst
            for syst in self.systematics
            if _contains(syst.regions, region.name) and _contains(syst.samples, sample.name)
        )

    def norm_factors_for(self, region: Region, sample: Sample) -> tuple[NormFactor, ...]:
        return tuple(
            nf
            for nf in self.norm_factors
            if _contains(nf.regions, region.name) and _contains(nf.samples, sample.name)
        )

    def templates(self) -> Iterator[Template]:
        """Every histogram the workspace needs, in config order.

        Per region: the data, then per prediction sample the nominal and the Up/Down variations
        of its NormPlusShape systematics (a ``Symmetrize`` side is derived from the other side
        and read from no file; Normalization systematics need no histogram).
        """
        for region in self.regions:
            for sample in self.samples_in(region, data=True) + self.samples_in(region):
                yield self._template(region, sample, None, None)
                if sample.data:
                    continue
                for syst in self.systematics_for(region, sample):
                    if syst.type != "NormPlusShape":
                        continue
                    for side in ("Up", "Down"):
                        if not syst.side(side).symmetrize:
                            yield self._template(region, sample, syst, side)

    def _template(
        self, region: Region, sample: Sample, syst: Systematic | None, side: Side | None
    ) -> Template:
        over = syst.side(side) if syst is not None and side is not None else TemplateOverrides()
        region_path = over.region_path if over.region_path is not None else region.region_path
        sample_paths = over.sample_paths if over.sample_paths is not None else sample.sample_paths
        path = self.general.input_path
        if region_path is not None:
            path = path.replace("{RegionPath}", region_path)
        if "{SamplePath}" in path:
            paths = expand_paths(path.replace("{SamplePath}", p) for p in sample_paths)
        else:
            paths = expand_paths([path])
        filter_ = over.filter or sample.filter or region.filter
        return Template(
            region=region,
            sample=sample,
            variation="nominal" if syst is None else f"{syst.name}_{side}",
            paths=paths,
            tree=over.tree or sample.tree,
            filter=filter_,
            weight=over.weight or sample.weight,
            variable=over.variable or region.variable,
        )


# ----------------------------------------------------------------------------- loading
def load(path: str | pathlib.Path) -> Config:
    """Read, validate and convert the YAML analysis configuration at ``path``.

    The YAML is read by :class:`_SafeLoader`: no Python objects, no duplicate keys, bounded alias
    expansion, and YAML 1.2 numbers (``1e-6`` is a number, not a string).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: configuration file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_SafeLoader)  # noqa: S506 (a SafeLoader)
    except _RefusedYAML as err:
        raise ConfigError(f"{path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; expected a configuration") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return from_dict(raw, source=path.name)


def from_dict(raw: Any, *, source: str = "config") -> Config:
    """Validate a configuration given as a dictionary and convert it to a :class:`Config`."""
    validate(raw, source=source)
    return _convert(raw, source)


def validate(raw: Any, *, source: str = "config") -> None:
    """Raise ConfigError unless ``raw`` is a valid configuration (schema, then semantics)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with General, Regions, Samples, ...")
    _check_finite(raw, source)
    schema = _schema()
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(raw))
    # a misspelt key shows up twice (unknown key, missing key): name the typo
    typos = [e for e in errors if e.validator == "additionalProperties"]
    error = jsonschema.exceptions.best_match(typos or errors)
    if error is not None:
        raise ConfigError(f"{source}: {_describe(error, schema)}")
    _check_expressions(raw, source)
    _check_semantics(raw, source)


def load_cuts(path: str | pathlib.Path, config: Config) -> Config:
    """Apply a ``cuts.json`` file (cut name -> value) to ``config``.

    The file must be strict JSON: Python's reader accepts ``NaN`` and ``Infinity``, which no
    threshold can be, so they are refused here; a cut given twice (the last would silently win)
    is refused too. The values are checked by :meth:`Config.with_cut_values`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: cuts file not found")

    def no_constants(token: str) -> float:
        raise ConfigError(
            f"{path}: not valid JSON: {token} is not a number; expected finite numbers"
        )

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for name, value in pairs:
            if name in seen:
                raise ConfigError(f"{path}: cut {name!r} is given twice; expected each cut once")
            seen[name] = value
        return seen

    def no_huge_integers(token: str) -> int:
        if len(token.lstrip("-")) > 300:
            raise ConfigError(f"{path}: an integer of {len(token)} digits; expected cut values")
        return int(token)

    try:
        values = json.loads(
            path.read_text(),
            parse_constant=no_constants,
            object_pairs_hook=no_duplicates,
            parse_int=no_huge_integers,
        )
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; expected an object of cuts") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected an object mapping cut names to values")
    return config.with_cut_values(values, source=str(path))


# ----------------------------------------------------------------------------- reading YAML
#: most nodes that YAML aliases may add to a document when they are written out; configurations
#: share a list of samples or a binning, a few thousand nodes at most, while a "billion laughs"
#: file of 2 kB expands to 10**9
MAX_ALIAS_NODES = 100_000


class _RefusedYAML(yaml.YAMLError):
    """YAML that parses but is refused: duplicate keys, a too large alias expansion."""


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only, never Python objects), stricter in three ways.

    - A key given twice in one mapping is an error (PyYAML keeps the last silently, so a second
      ``Name`` or ``Binning`` would replace the first unnoticed). Keys merged in with ``<<`` may be
      overridden, as YAML intends.
    - Aliases may add at most :data:`MAX_ALIAS_NODES` nodes to the document when written out, and
      may not refer to a node that contains them. PyYAML shares aliased objects, but everything
      that walks the result (schema validation, the checks here) visits every copy, so a few
      kilobytes of nested aliases would take hours and gigabytes.
    - Numbers in exponent notation without a dot (``1e-6``, ``1e999``) are floats, as in YAML 1.2
      and JSON; PyYAML (YAML 1.1) reads them as strings.
    """

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_line:
                earlier = first_line[key.tag, key.value]
                lines = f"lines {earlier} and {line}" if earlier != line else f"line {line}, twice"
                raise _RefusedYAML(f"duplicate key {key.value!r} at {lines}")
            first_line[key.tag, key.value] = line
        return node

    def construct_document(self, node: yaml.Node) -> Any:
        written = _count_nodes(node)
        _expanded_size(node, written + MAX_ALIAS_NODES, {}, set())
        return super().construct_document(node)


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _count_nodes(root: yaml.Node) -> int:
    """Number of distinct nodes in the document as written (each alias target once)."""
    seen = {id(root)}
    stack = [root]
    while stack:
        for child in _children(stack.pop()):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return len(seen)


def _expanded_size(node: yaml.Node, limit: int, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Number of nodes under ``node`` with every alias written out; refused above ``limit``.

    Each distinct node is sized once (``sizes``), so this costs the size of the file, not of the
    expansion; ``open_nodes`` are the nodes being sized, an alias to one of them is a cycle.
    """
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _RefusedYAML(
            f"line {node.start_mark.line + 1}: an alias refers to the node that contains it; "
            "expected a finite document"
        )
    open_nodes.add(key)
    total = 1
    for child in _children(node):
        total += _expanded_size(child, limit, sizes, open_nodes)
        if total > limit:
            raise _RefusedYAML(
                f"YAML aliases expand the document from {limit - MAX_ALIAS_NODES} nodes as "
                f"written to more than {limit}; the expansion is too large (expected aliases to "
                f"add at most {MAX_ALIAS_NODES} nodes)"
            )
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _check_finite(raw: Any, source: str, parts: tuple[Any, ...] = ()) -> None:
    """Refuse NaN and infinite numbers anywhere in ``raw``, naming their YAML path.

    YAML spells them ``.nan``, ``.inf`` and ``-.inf`` (and ``1e999`` overflows to infinity); the
    schema's ``"type": "number"`` accepts them and its ``minimum`` comparisons are false for NaN,
    so one walk over the whole document catches them in every field, present and future. The
    same walk refuses integers too large for a float (a 400-digit ``Bounds``) and mapping keys
    that are not strings (YAML allows ``1: 2``; every key of a configuration is a name).
    """
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{source}: {_yaml_path(parts)}: expected a finite number, got {raw!r}")
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) > 1e300:
        raise ConfigError(
            f"{source}: {_yaml_path(parts)}: expected a number of float size, got an integer "
            f"of {len(str(abs(raw)))} digits"
        )
    if isinstance(raw, dict):
        for key, value in raw.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{source}: {_yaml_path(parts)}: key {key!r} is a {type(key).__name__}; "
                    "expected a name (a string)"
                )
            _check_finite(value, source, (*parts, key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            _check_finite(value, source, (*parts, i))


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be part of a file name, or None when it can.

    Region, sample, systematic and normfactor names become parts of file names and paths:
    plots (``cutflow_<region>.png``, ``templates_<region>_<sample>_<systematic>.png``), report
    sections, and the output files of Snakemake rules. So a name must be
    - not empty, ``.`` or ``..`` (those mean "this folder" and "the folder above");
    - free of ``/`` and ``\\`` (path separators would put the file into another folder);
    - free of control characters (NUL ends a path in C; newlines and tabs break log lines and
      shell commands);
    - free of ``{`` and ``}`` (Snakemake reads them as wildcards in output paths);
    - not starting with ``-`` (command-line tools would read it as an option) nor with or ending in
      whitespace (invisible, and stripped by many tools).
    Everything else is allowed: letters of any script, digits, spaces inside, ``_ - . + :``.
    """
    if name in ("", ".", ".."):
        return f"it is {name!r}"
    for char in ("/", "\\", "{", "}"):
        if char in name:
            return f"it contains {char!r}"
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"it contains the control character {control!r}"
    if name.startswith("-"):
        return "it starts with '-'"
    if name != name.strip():
        return "it starts or ends with whitespace"
    return None


def _schema() -> dict[str, Any]:
    text = resources.files("analysis").joinpath("schemas/config.json").read_text()
    return json.loads(text)


def _yaml_path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError, schema: dict[str, Any]) -> str:
    """One line for a schema error: YAML path, what was found, what was expected."""
    where = _yaml_path(list(error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(_resolve(error.schema, schema).get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = extra[0]
        return (
            f"{where}: unknown key '{key}'{_suggest(key, allowed)}; allowed: {', '.join(allowed)}"
        )
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{where}: missing required key '{missing}'"
    if error.validator == "enum":
        options = ", ".join(repr(o) for o in error.validator_value)
        return f"{where}: {error.instance!r} is not one of {options}"
    if error.validator == "minLength":
        least = error.validator_value
        return f"{where}: expected at least {least} character(s), got {error.instance!r}"
    if error.validator == "type":
        return f"{where}: expected {error.validator_value}, got {error.instance!r}"
    return f"{where}: {error.message}"


def _resolve(subschema: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = subschema.get("$ref")
    if ref is None:
        return subschema
    node: Any = schema
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _suggest(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _as_tuple(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _contains(names: tuple[str, ...] | None, name: str) -> bool:
    return names is None or name in names


def _check_semantics(raw: dict[str, Any], source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    def safe_name(where: str, name: str) -> None:
        problem = file_name_problem(name)
        if problem is not None:
            fail(
                f"{where}: {name!r} cannot be used in file names, {problem}; expected a "
                "name without '/', '\\', '{', '}' or control characters, not '.' or '..', not "
                "starting with '-' or with whitespace at either end"
            )

    for section in ("Regions", "Samples", "Systematics", "NormFactors"):
        for i, item in enumerate(raw.get(section, [])):
            safe_name(f"{section}[{i}].Name", item["Name"])

    def unique(section: str, items: list[dict[str, Any]], key: str = "Name") -> set[str]:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item[key] in seen:
                fail(f"{section}[{i}].{key}: '{item[key]}' is used twice; names must be unique")
            seen.add(item[key])
        return seen

    general = raw["General"]
    _check_input_type(raw, source)
    definitions = raw.get("Definitions", [])
    def_names = unique("Definitions", definitions)
    for i, definition in enumerate(definitions):
        if definition["Name"] in RESERVED_NAMES:
            fail(f"Definitions[{i}].Name: '{definition['Name']}' is reserved for a module name")
    for i, sample in enumerate(raw["Samples"]):
        own = sample.get("Definitions", [])
        unique(f"Samples[{i}].Definitions", own)
        for j, definition in enumerate(own):
            if definition["Name"] in RESERVED_NAMES:
                fail(
                    f"Samples[{i}].Definitions[{j}].Name: '{definition['Name']}' is reserved "
                    "for a module name"
                )
    regions = raw["Regions"]
    region_names = unique("Regions", regions)
    samples = raw["Samples"]
    sample_names = unique("Samples", samples)
    data = [s["Name"] for s in samples if s.get("Data", False)]
    if len(data) != 1:
        fail(f"Samples: expected exactly one sample with Data: true, found {len(data)}")
    nf_names = unique("NormFactors", raw["NormFactors"])
    systematics = raw.get("Systematics", [])
    unique("Systematics", systematics)
    del def_names

    cut_names: dict[str, tuple[str, int, dict[str, Any]]] = {}  # name -> (where, region, cut)
    for i, region in enumerate(regions):
        edges = region.get("Binning", [])  # optional with histogram inputs
        if any(not math.isfinite(e) for e in edges) or any(
            b <= a for a, b in zip(edges, edges[1:], strict=False)
        ):
            fail(
                f"Regions[{i}].Binning: bin edges must be finite and strictly increasing, "
                f"got {edges}"
            )
        if "Rebin" in region:
            fail(f"Regions[{i}].Rebin: rebinning histogram inputs is not supported")
        for j, cut in enumerate(region.get("Cuts", [])):
            where = f"Regions[{i}].Cuts[{j}]"
            name = cut.get("Name", f"{region['Name']}:{cut['Variable']}{cut['Direction']}")
            if name in cut_names:
                first_where, first_region, first = cut_names[name]
                if first_region == i:
                    fail(f"{where}: cut name '{name}' is used twice; give the cut a unique Name")
                _check_shared_cut(source, name, (first_where, first), (where, cut))
            else:
                cut_names[name] = (where, i, cut)
            trainable = cut.get("Trainable", True)
            if "Bounds" not in cut:
                if trainable:
                    fail(f"{where}: a trainable cut needs Bounds [low, high]")
                continue
            low, high = cut["Bounds"]
            if not low <= cut["Value"] <= high or (trainable and low >= high):
                fail(
                    f"{where}: Value {cut['Value']} must lie within Bounds [{low}, {high}] "
                    "(low < high)"
                )

    def check_refs(where: str, item: dict[str, Any], key: str, known: set[str]) -> None:
        for name in _as_tuple(item.get(key)) or ():
            if name not in known:
                fail(f"{where}.{key}: unknown name '{name}'{_suggest(name, known)}")

    for i, sample in enumerate(samples):
        check_refs(f"Samples[{i}]", sample, "Regions", region_names)
    for i, nf in enumerate(raw["NormFactors"]):
        check_refs(f"NormFactors[{i}]", nf, "Regions", region_names)
        check_refs(f"NormFactors[{i}]", nf, "Samples", sample_names)
        if "Bounds" in nf:
            low, high = nf["Bounds"]
            if not low < high:
                fail(f"NormFactors[{i}].Bounds: expected low < high, got {nf['Bounds']}")
            if "Nominal" in nf and not low <= nf["Nominal"] <= high:
                fail(f"NormFactors[{i}].Nominal: {nf['Nominal']} is outside Bounds {nf['Bounds']}")
    for i, syst in enumerate(systematics):
        where = f"Systematics[{i}]"
        check_refs(where, syst, "Regions", region_names)
        check_refs(where, syst, "Samples", sample_names)
        if "Smoothing" in syst:
            fail(f"{where}.Smoothing: template smoothing is not supported")
        if syst["Type"] == "Normalization":
            for side in ("Up", "Down"):
                if "Normalization" not in syst[side]:
                    fail(f"{where}.{side}: a Normalization systematic needs a Normalization value")
        elif syst["Up"].get("Symmetrize") and syst["Down"].get("Symmetrize"):
            fail(f"{where}: Up and Down cannot both be symmetrized")
        if data[0] in (_as_tuple(syst.get("Samples")) or ()):
            fail(f"{where}.Samples: a systematic cannot act on the data sample '{data[0]}'")
    poi = general.get("POI")
    if poi and poi not in nf_names:
        fail(f"General.POI: '{poi}' is not a NormFactor{_suggest(poi, nf_names)}")
    for i, fixed in enumerate(general.get("Fixed", [])):
        if fixed["Name"] == poi:
            fail(f"General.Fixed[{i}]: the POI '{poi}' cannot be fixed")


def _check_shared_cut(
    source: str, name: str, first: tuple[str, dict[str, Any]], other: tuple[str, dict[str, Any]]
) -> None:
    """A cut Name in several regions is one threshold (one entry of ``cuts.json``, one trainable
    parameter): every occurrence must have the same Variable, Direction, Value, Bounds and
    Trainable; ConfigError naming the first difference otherwise."""
    (first_where, a), (where, b) = first, other
    for key, default in (
        ("Variable", None),
        ("Direction", None),
        ("Value", None),
        ("Bounds", None),
        ("Trainable", True),
    ):
        mine, theirs = b.get(key, default), a.get(key, default)
        if mine != theirs:
            raise ConfigError(
                f"{source}: {where}.{key}: cut '{name}' is shared with {first_where}, where "
                f"{key} is {theirs!r}, here {mine!r}; a Name used in several regions is one "
                "threshold: give it the same Variable, Direction, Value, Bounds and Trainable, "
                "or another Name"
            )


#: keys that select, weight or define events: meaningless for histogram inputs
_EVENT_KEYS = {
    "Regions": ("Filter", "Cuts"),
    "Samples": ("Weight", "Filter", "Definitions"),
    "Systematics": ("Tree", "Weight", "Variable", "Filter"),
}


def _input_type(raw: dict[str, Any]) -> Literal["ntuple", "histogram"]:
    """``"ntuple"`` when every sample has a ``Tree``, else ``"histogram"`` (cabinetry's
    ``configuration._input_is_ntuple``, which its ``templates`` command uses to choose between
    building histograms from ntuples and collecting existing ones)."""
    return "ntuple" if all("Tree" in sample for sample in raw["Samples"]) else "histogram"


def _check_input_type(raw: dict[str, Any], source: str) -> None:
    """The keys that ntuple inputs need and histogram inputs cannot use (and vice versa).

    The input type is :func:`_input_type`'s. cabinetry reads histograms as soon as one sample
    lacks a Tree and then ignores the Trees; here Trees on some samples only are refused, since
    one of them would be ignored. Ntuple inputs need ``Variable`` and ``Binning`` in every region
    (cabinetry's schema requires them "for ntuple inputs") and have no ``VariationPath``.
    Histogram inputs (:mod:`analysis.histogram_inputs`) are read as they are: no key that
    selects, weights or defines events (:data:`_EVENT_KEYS`, and ``Definitions``), one
    ``SamplePath`` per sample (a list is for ntuples, as in cabinetry), and a ``RegionPath``
    (``SamplePath``) in every region (sample) when ``InputPath`` holds ``{RegionPath}``
    (``{SamplePath}``), where cabinetry's ``_histo_path`` raises "no path setting found".
    """

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    samples, regions, systematics = raw["Samples"], raw["Regions"], raw.get("Systematics", [])
    with_tree = [i for i, sample in enumerate(samples) if "Tree" in sample]
    if _input_type(raw) == "ntuple":
        for i, region in enumerate(regions):
            for key in ("Variable", "Binning"):
                if key not in region:
                    fail(
                        f"Regions[{i}]: missing required key '{key}' (ntuple inputs: every "
                        "sample has a Tree; histogram inputs, where no sample has one, need "
                        "neither)"
                    )
        holders = ["General"] * ("VariationPath" in raw["General"]) + [
            f"Systematics[{i}].{side}"
            for i, syst in enumerate(systematics)
            for side in ("Up", "Down")
            if "VariationPath" in syst[side]
        ]
        if holders:
            fail(
                f"{holders[0]}.VariationPath: only histogram inputs have a VariationPath; this "
                "configuration reads ntuples (every sample has a Tree)"
            )
        return
    if with_tree:
        i = next(i for i in range(len(samples)) if i not in with_tree)
        fail(
            f"Samples[{i}]: missing required key 'Tree' (Samples[{with_tree[0]}] has one: ntuple "
            "inputs need a Tree in every sample, histogram inputs in none)"
        )

    def no_event_keys(where: str, item: dict[str, Any], keys: Sequence[str]) -> None:
        for key in keys:
            if key in item:
                fail(
                    f"{where}{key}: histogram inputs (no sample has a Tree) have no events to "
                    f"select, weight or define; expected no {key} (or a Tree in every sample, "
                    "for ntuple inputs)"
                )

    no_event_keys("", raw, ("Definitions",))
    input_path = raw["General"]["InputPath"]
    for section, items in (("Regions", regions), ("Samples", samples)):
        placeholder = "RegionPath" if section == "Regions" else "SamplePath"
        for i, item in enumerate(items):
            no_event_keys(f"{section}[{i}].", item, _EVENT_KEYS[section])
            if "{" + placeholder + "}" in input_path and placeholder not in item:
                fail(
                    f"{section}[{i}]: missing {placeholder}; General.InputPath "
                    f"'{input_path}' uses {{{placeholder}}}"
                )
    lists = [(f"Samples[{i}]", s) for i, s in enumerate(samples)]
    for i, syst in enumerate(systematics):
        for side in ("Up", "Down"):
            no_event_keys(f"Systematics[{i}].{side}.", syst[side], _EVENT_KEYS["Systematics"])
            lists.append((f"Systematics[{i}].{side}", syst[side]))
    for where, item in lists:
        if isinstance(item.get("SamplePath"), list):
            fail(
                f"{where}.SamplePath: histogram inputs take one path per sample (a list reads "
                f"several ntuple files, as in cabinetry), got {item['SamplePath']}"
            )


def _definition(raw: dict[str, Any]) -> Definition:
    return Definition(
        raw["Name"],
        raw["Expression"],
        description=raw.get("Description"),
        unit=raw.get("Unit"),
        label=raw.get("Label"),
    )


def _template_overrides(raw: dict[str, Any]) -> TemplateOverrides:
    return TemplateOverrides(
        tree=raw.get("Tree"),
        weight=raw.get("Weight"),
        variable=raw.get("Variable"),
        filter=raw.get("Filter"),
        region_path=raw.get("RegionPath"),
        sample_paths=_as_tuple(raw.get("SamplePath")),
        normalization=raw.get("Normalization"),
        symmetrize=raw.get("Symmetrize", False),
        variation_path=raw.get("VariationPath"),
    )


def _convert(raw: dict[str, Any], source: str) -> Config:
    general = raw["General"]
    regions = tuple(
        Region(
            name=r["Name"],
            variable=r.get("Variable", ""),  # optional with histogram inputs
            binning=tuple(float(e) for e in r.get("Binning", ())),
            filter=r.get("Filter"),
            cuts=tuple(
                Cut(
                    name=c.get("Name", f"{r['Name']}:{c['Variable']}{c['Direction']}"),
                    variable=c["Variable"],
                    direction=c["Direction"],
                    value=float(c["Value"]),
                    bounds=cast(  # the schema requires two bounds
                        "tuple[float, float]",
                        tuple(float(b) for b in c.get("Bounds", (c["Value"], c["Value"]))),
                    ),
                    trainable=c.get("Trainable", True),
                )
                for c in r.get("Cuts", [])
            ),
            region_path=r.get("RegionPath"),
            type=r.get("Type", "Signal"),
        )
        for r in raw["Regions"]
    )
    samples = tuple(
        Sample(
            name=s["Name"],
            tree=s.get("Tree", ""),  # none with histogram inputs
            sample_paths=_as_tuple(s.get("SamplePath")) or (),
            weight=s.get("Weight"),
            filter=s.get("Filter"),
            data=s.get("Data", False),
            disable_staterror=s.get("DisableStaterror", False),
            regions=_as_tuple(s.get("Regions")),
            definitions=tuple(_definition(d) for d in s.get("Definitions", [])),
        )
        for s in raw["Samples"]
    )
    systematics = tuple(
        Systematic(
            name=s["Name"],
            type=s["Type"],
            up=_template_overrides(s["Up"]),
            down=_template_overrides(s["Down"]),
            regions=_as_tuple(s.get("Regions")),
            samples=_as_tuple(s.get("Samples")),
            modifier_name=s.get("ModifierName", s["Name"]),
        )
        for s in raw.get("Systematics", [])
    )
    norm_factors = tuple(
        NormFactor(
            name=n["Name"],
            regions=_as_tuple(n.get("Regions")),
            samples=_as_tuple(n.get("Samples")),
            nominal=n.get("Nominal"),
            bounds=tuple(n["Bounds"]) if "Bounds" in n else None,
        )
        for n in raw["NormFactors"]
    )
    opt = raw.get("Optimization", {})
    temp = opt.get("Temperature", {})
    defaults = Optimization()
    optimization = Optimization(
        objective=opt.get("Objective", defaults.objective),
        steps=int(opt.get("Steps", defaults.steps)),
        learning_rate=float(opt.get("LearningRate", defaults.learning_rate)),
        bandwidth=float(opt.get("Bandwidth", defaults.bandwidth)),
        bandwidth_levels=int(opt.get("BandwidthLevels", defaults.bandwidth_levels)),
        temperature=Temperature(
            initial=float(temp.get("Initial", defaults.temperature.initial)),
            final=float(temp.get("Final", defaults.temperature.final)),
            schedule=temp.get("Schedule", defaults.temperature.schedule),
        ),
        evaluate_every=int(opt.get("EvaluateEvery", defaults.evaluate_every)),
        checkpoint_every=int(opt.get("CheckpointEvery", defaults.checkpoint_every)),
        seed=int(opt.get("Seed", defaults.seed)),
        min_effective_events=float(opt.get("MinEffectiveEvents", defaults.min_effective_events)),
    )
    return Config(
        source=source,
        general=General(
            measurement=general["Measurement"],
            poi=general.get("POI") or None,
            input_path=general["InputPath"],
            fixed={f["Name"]: float(f["Value"]) for f in general.get("Fixed", [])},
            yield_floor=float(general.get("YieldFloor", 1e-6)),
            variation_path=general.get("VariationPath", ""),
            input_type=_input_type(raw),
            luminosity=float(general["Luminosity"]) if "Luminosity" in general else None,
            energy=float(general["Energy"]) if "Energy" in general else None,
            experiment=general.get("Experiment"),
            label=general.get("Label"),
        ),
        definitions=tuple(_definition(d) for d in raw.get("Definitions", [])),
        regions=regions,
        samples=samples,
        systematics=systematics,
        norm_factors=norm_factors,
        optimization=optimization,
    )


def expression_locations(raw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Every expression of a (schema-valid) raw configuration, with its YAML path."""
    for i, definition in enumerate(raw.get("Definitions", [])):
        yield f"Definitions[{i}].Expression", definition["Expression"]
    for i, region in enumerate(raw["Regions"]):
        for key in ("Variable", "Filter"):
            if key in region:
                yield f"Regions[{i}].{key}", region[key]
        for j, cut in enumerate(region.get("Cuts", [])):
            yield f"Regions[{i}].Cuts[{j}].Variable", cut["Variable"]
    for i, sample in enumerate(raw["Samples"]):
        for key in ("Weight", "Filter", "Variable"):
            if key in sample:
                yield f"Samples[{i}].{key}", sample[key]
        for j, definition in enumerate(sample.get("Definitions", [])):
            yield f"Samples[{i}].Definitions[{j}].Expression", definition["Expression"]
    for i, syst in enumerate(raw.get("Systematics", [])):
        for side in ("Up", "Down"):
            for key in ("Weight", "Filter", "Variable"):
                if key in syst[side]:
                    yield f"Systematics[{i}].{side}.{key}", syst[side][key]


def _check_expressions(raw: dict[str, Any], source: str) -> None:
    """Parse every expression against the allowlist of :mod:`analysis.expressions`, and refuse
    cycles among the Definitions in effect for any sample (the global ones, and each sample's
    with the global ones: :func:`analysis.expressions.definition_order`)."""
    from analysis import expressions  # numpy/awkward/vector: only when a config is validated

    located = list(expression_locations(raw))
    fields = expressions.record_fields(text for _, text in located)
    for where, text in located:
        expressions.parse(text, f"{source}: {where}", fields)

    def reads(definitions: list[dict[str, Any]]) -> dict[str, frozenset[str]]:
        return {
            d["Name"]: expressions.parse(d["Expression"], "", fields).names for d in definitions
        }

    common = reads(raw.get("Definitions", []))  # no cycles, alone or with a sample's own
    expressions.definition_order(common, f"{source}: Definitions")
    for i, sample in enumerate(raw["Samples"]):
        if sample.get("Definitions"):
            own = reads(sample["Definitions"])
            expressions.definition_order(common | own, f"{source}: Samples[{i}].Definitions")
