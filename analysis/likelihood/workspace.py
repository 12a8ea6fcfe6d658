"""pyhf workspaces: loading (JSON, HistFactory XML, patches, patchsets), validation, export.

A :class:`Workspace` holds a validated pyhf JSON workspace spec whose numbers may be torch
tensors (histograms that carry gradients). Validation runs pyhf's JSON schema on a detached
copy, then checks what the schema cannot say (unique names, bin counts, an observation per
channel). Errors are one line naming the file and the JSON path:
``ws.json: channels[0].samples[1].modifiers[0]: 'type' is a required property``.

Patches are applied to the *workspace* spec (paths like ``/channels/0/samples/-``), as
``pyhf patchset apply`` does: a JSON Patch file (a list of operations) or ``FILE:NAME`` for the
patch ``NAME`` of a pyhf patchset, whose digests must match the workspace (pyhf verifies them
too).

Reading, patching, validating and writing a workspace does not import torch (``import torch``
takes longer than a whole pyhf fit of a small workspace on the numpy backend): only
:meth:`Workspace.model` and :meth:`Workspace.data`, which return torch objects, import it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import marshal
import numbers
import os
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import fastjsonschema
import jsonpatch
import jsonpointer

from analysis.errors import ConfigError, DataError, InputFileError, MissingObjectError
from analysis.likelihood._tensors import as_tensor, structural_copy, to_plain

if TYPE_CHECKING:
    import jsonschema
    import jsonschema.protocols
    import torch

    from analysis.likelihood.model import Model

log = logging.getLogger(__name__)

Source = str | os.PathLike | Mapping[str, Any]

MODIFIER_TYPES: tuple[str, ...] = (
    "histosys",
    "lumi",
    "normfactor",
    "normsys",
    "shapefactor",
    "shapesys",
    "staterror",
)
"""The HistFactory modifier type names, in the order of
:data:`analysis.likelihood.modifiers.REGISTRY` (pyhf's), for validation and its messages
without importing the modifiers (they import torch); a test keeps the two equal."""


@dataclass(frozen=True)
class Workspace:
    """A validated pyhf JSON workspace (``channels``, ``observations``, ``measurements``)."""

    spec: dict
    source: str = field(default="workspace", compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, source: Source, patches: Sequence[str | os.PathLike] = ()) -> Workspace:
        """Read a pyhf JSON workspace, a HistFactory XML top-level file or a dict, then apply
        ``patches`` (JSON Patch files or ``PATCHSET.json:NAME``) and validate the result.

        XML: ``<Input>`` and ROOT file paths are relative to a base directory, as in ROOT's
        ``hist2workspace``; the first of the XML file's folder, its parent folder and the
        current directory in which every ``<Input>`` exists is used (pyhf's ``rootdir``).
        """
        if isinstance(source, Mapping):
            workspace = cls.from_spec(source)
        else:
            path = pathlib.Path(source)
            if not path.is_file():
                raise InputFileError(f"{source}: no such file")
            if path.suffix.lower() == ".xml":
                spec = _read_xml(path)
            else:
                spec = _read_json(path)
            workspace = cls.from_spec(spec, source=str(source))
        for patch in patches:
            workspace = workspace._patched(patch)
        return workspace

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, source: str = "workspace") -> Workspace:
        """Wrap ``spec`` (may hold tensors, which are kept, not copied) after validating it."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{source}: a workspace must be a JSON object, got {type(spec)}")
        validate(spec, source)
        return cls(spec=structural_copy(spec), source=source)

    def _patched(self, patch: str | os.PathLike) -> Workspace:
        text = str(patch)
        head, sep, name = text.rpartition(":")
        if sep and name and head and pathlib.Path(head).is_file():
            ops, label = _patchset_ops(pathlib.Path(head), name, self)
        else:
            ops, label = _patch_file_ops(pathlib.Path(patch)), text
        spec = structural_copy(self.spec)
        for i, op in enumerate(ops):
            try:
                spec = jsonpatch.JsonPatch([op]).apply(spec, in_place=True)
            except (
                jsonpatch.JsonPatchException,
                jsonpointer.JsonPointerException,
                KeyError,
                IndexError,
                TypeError,
            ) as exc:
                raise ConfigError(
                    f"{label}: operation {i} ({op.get('op')} {op.get('path')}) does not apply to "
                    f"{self.source}: {exc}"
                ) from None
        return Workspace.from_spec(spec, source=f"{self.source} patched with {label}")

    # ------------------------------------------------------------------ access
    @property
    def measurement_names(self) -> tuple[str, ...]:
        return tuple(m["name"] for m in self.spec["measurements"])

    def measurement(self, name: str | None = None) -> dict:
        """The measurement ``name`` (default: the first, as pyhf)."""
        names = self.measurement_names
        if name is None:
            if len(names) > 1:
                log.warning("%s: several measurements, using the first (%s)", self.source, names[0])
            return self.spec["measurements"][0]
        if name not in names:
            raise ConfigError(
                f"{self.source}: no measurement named '{name}'; valid: {', '.join(names)}"
            )
        return self.spec["measurements"][names.index(name)]

    def model(
        self,
        measurement: str | None = None,
        *,
        modifier_settings: Mapping[str, Mapping[str, Any]] | None = None,
        poi_name: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> Model:
        """The :class:`Model` of ``measurement`` (default: the first one).

        ``poi_name`` overrides the measurement's POI; ``""`` builds a model without POI.
        ``modifier_settings`` as in pyhf (``None``: normsys code4, histosys code4p).
        ``dtype`` ``None`` is ``torch.float64`` (a default that does not import torch when this
        module is imported; this method does).
        """
        import torch

        from analysis.likelihood.model import Model

        meas = self.measurement(measurement)
        poi = meas["config"]["poi"] if poi_name is None else poi_name
        if poi_name is None and not poi:
            raise ConfigError(
                f"{self.source}: measurement '{meas['name']}' has no POI; pass poi_name "
                "('' for a model without POI)"
            )
        return Model(
            self.model_spec(meas["name"]),
            poi_name=poi or None,
            modifier_settings=modifier_settings,
            dtype=torch.float64 if dtype is None else dtype,
            device=device,
            source=self.source,
        )

    def model_spec(self, measurement: str | None = None) -> dict:
        """The pyhf *model* spec of ``measurement`` (default: the first one), what :class:`Model`
        is built from: ``{"channels": ..., "parameters": the measurement's parameter
        settings}``, sharing this spec's objects (tensors included)."""
        meas = self.measurement(measurement)
        return {"channels": self.spec["channels"], "parameters": meas["config"]["parameters"]}

    def signal_samples(self, measurement: str | None = None) -> tuple[str, ...]:
        """Names of the samples scaled by the measurement's POI (a ``normfactor`` of that name
        in some channel), in channel then sample order; empty without a POI."""
        poi = self.measurement(measurement)["config"]["poi"]
        names: dict[str, None] = {}
        for channel in self.spec["channels"]:
            for sample in channel["samples"]:
                if poi and any(
                    m["type"] == "normfactor" and m["name"] == poi for m in sample["modifiers"]
                ):
                    names[sample["name"]] = None
        return tuple(names)

    def data(self, model: Model, include_auxdata: bool = True) -> torch.Tensor:
        """Observed main data in ``model``'s channel order, then ``model.auxdata``."""
        import torch

        observed = {o["name"]: o["data"] for o in self.spec["observations"]}
        parts = []
        for channel in model.channels:
            if channel not in observed:
                raise DataError(f"{self.source}: no observation for channel '{channel}'")
            values = as_tensor(observed[channel], dtype=model.dtype, device=model.device)
            if values.shape != (model.channel_nbins[channel],):
                raise DataError(
                    f"{self.source}: observation of channel '{channel}' has "
                    f"{tuple(values.shape)} values, the model {model.channel_nbins[channel]} bins"
                )
            parts.append(values)
        if include_auxdata:
            parts.append(model.auxdata)
        return torch.cat(parts)

    def to_json(self) -> dict:
        """A plain, detached, pyhf-valid copy of the spec (tensors become lists of floats)."""
        plain = to_plain(self.spec)
        plain.setdefault("version", PYHF_SCHEMA_VERSION)
        return plain


# ---------------------------------------------------------------------- validation
def validate(spec: Mapping[str, Any], source: str) -> None:
    """Schema and semantic checks; ConfigError naming ``source`` and the JSON path.

    Runs at most once per content in a process: the outcome depends on the content alone (the
    ``source`` only names it in messages), and pyhf's jsonschema validation of a published
    workspace takes seconds (1.5 to 2.5 s for 44 channels and 219 parameters on a 2-core
    machine), against about 0.1 s for the canonical JSON text and its hash. Only successes
    are remembered, in :data:`_VALIDATED` (SHA-256 of the canonical text).

    The schema check itself runs first through a validator compiled to Python code
    (``fastjsonschema``, 0.6 s there); only a spec it rejects goes through jsonschema, whose
    verdict is final and whose first error is the message (so the outcome and the messages are
    jsonschema's, the compiled validator only makes valid specs fast).
    """
    plain = to_plain(spec)
    digest = _content_digest(plain)
    if digest is not None and digest in _VALIDATED:
        return
    _check_modifier_types(plain, source)
    if not _compiled_schema_accepts("workspace.json", plain):
        error = next(pyhf_schema("workspace.json").iter_errors(plain), None)
        if error is not None:
            raise ConfigError(_schema_message(error, source))
    _check_semantics(plain, source)
    if digest is not None:
        _VALIDATED[digest] = None
        while len(_VALIDATED) > _VALIDATED_MAX:
            del _VALIDATED[next(iter(_VALIDATED))]  # the oldest


_VALIDATED: dict[str, None] = {}
"""Digests of the workspace specs that passed :func:`validate` in this process, oldest first
(a memo of a pure function, not state: forgetting one only costs a validation)."""

_VALIDATED_MAX = 256


PYHF_SCHEMA_VERSION = "1.0.0"
"""The version of pyhf's JSON schemas (``pyhf.schema.version``) that workspaces are checked
against."""


@functools.cache
def pyhf_schema(name: str) -> jsonschema.protocols.Validator:
    """A jsonschema validator of pyhf's schema ``name`` (``workspace.json``,
    ``jsonpatch.json``, ...), built once, that judges as ``pyhf.schema.validate`` does: the
    schema files pyhf ships (version :data:`PYHF_SCHEMA_VERSION`), draft 6, any
    ``numbers.Number`` is a number; raise or report its first error (``iter_errors``).

    Without importing pyhf: its import loads its numpy backend and scipy.stats, a second of the
    start-up of every command that reads a workspace. The ``$ref`` are inlined (pyhf's schemas
    are not recursive): resolving the 56,000 references of a published workspace through a
    ``referencing`` registry made validation 1.4 times slower than pyhf's; inlined, it is as
    fast as pyhf's.
    """
    import jsonschema  # 0.1 s of start-up: only for a spec the compiled validator rejects

    checker = jsonschema.Draft6Validator.TYPE_CHECKER.redefine(
        "number", lambda _checker, instance: isinstance(instance, numbers.Number)
    )
    validator = jsonschema.validators.extend(jsonschema.Draft6Validator, type_checker=checker)
    return validator(_inlined_schema(name))


@functools.cache
def _inlined_schema(name: str) -> dict:
    """pyhf's schema file ``name`` (version :data:`PYHF_SCHEMA_VERSION`) with every ``$ref``
    inlined, read from pyhf's installed package without importing it."""
    location = importlib.util.find_spec("pyhf")
    if location is None or not location.submodule_search_locations:
        raise ModuleNotFoundError("pyhf (its JSON schemas) is not installed")
    folder = pathlib.Path(next(iter(location.submodule_search_locations)))
    folder = folder / "schemas" / PYHF_SCHEMA_VERSION
    documents = {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}
    return cast(dict, _inline_refs(documents[name], name, documents, ()))


@functools.cache
def _compiled_schema(name: str) -> Callable[[Any], Any]:
    """pyhf's schema ``name`` (inlined, as :func:`pyhf_schema`) compiled by fastjsonschema.

    Generating and compiling its 180 kB of Python takes 45 ms, a seventh of a small
    workspace's whole ``diffana fit``: the generated module is kept in the cache folder
    (``analysis.cache.default_cache_dir() / "schemas"``, keyed by fastjsonschema's and
    Python's bytecode versions and the schema) as its marshalled code object, which later
    processes load in a millisecond. It is loaded from there
    only when it and its folder belong to this user and no one else may write them (the trust
    model of ssh's files); otherwise, or when the folder cannot be written, it is compiled
    here as before.
    """
    schema = _inlined_schema(name)
    try:
        return _cached_validator(name, schema)
    except OSError as exc:
        log.debug("schema cache not used: %s", exc)
        return cast(Callable[[Any], Any], fastjsonschema.compile(schema))


def _cached_validator(name: str, schema: dict) -> Callable[[Any], Any]:
    """The validator from the cache folder: the generated module's code object, marshalled
    (keyed by Python's bytecode magic number too), then run."""
    from analysis.cache import default_cache_dir
    from analysis.files import write_atomically

    version = f"{fastjsonschema.VERSION}\n{importlib.util.MAGIC_NUMBER.hex()}"
    key = hashlib.sha256(f"{version}\n{_content_digest(schema)}".encode()).hexdigest()[:24]
    folder = default_cache_dir() / "schemas"
    path = folder / f"{pathlib.Path(name).stem}_{key}.marshal"
    code = None
    if path.is_file():
        if not (_private(path) and _private(folder)):
            raise PermissionError(f"{path} or its folder may be written by others")
        try:
            code = marshal.loads(path.read_bytes())
        except (EOFError, ValueError, TypeError):  # a damaged entry is made again
            code = None
    if code is None:
        code = compile(fastjsonschema.compile_to_code(schema), str(path), "exec")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(path, marshal.dumps(code))
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # our own generated code, from a folder only this user may write
    return cast(Callable[[Any], Any], namespace["validate"])


def _private(path: pathlib.Path) -> bool:
    """Whether ``path`` belongs to this user and only this user may write it."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _compiled_schema_accepts(name: str, instance: Any) -> bool:
    try:
        _compiled_schema(name)(instance)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _inline_refs(node: Any, document: str, documents: Mapping[str, Any], seen: tuple) -> Any:
    """``node`` (of the schema file ``document``) with each ``{"$ref": "[FILE]#/a/b"}``
    replaced by what it points to, itself inlined. As in draft 6, the siblings of a ``$ref``
    (``$id``, ``$schema``) are ignored."""
    if isinstance(node, list):
        return [_inline_refs(item, document, documents, seen) for item in node]
    if not isinstance(node, Mapping):
        return node
    if "$ref" not in node:
        return {key: _inline_refs(value, document, documents, seen) for key, value in node.items()}
    file, _, pointer = node["$ref"].partition("#")
    target_document = file or document
    if (target_document, pointer) in seen:
        raise ValueError(f"pyhf's schema {target_document}#{pointer} refers to itself")
    target = documents[target_document]
    for part in filter(None, pointer.split("/")):  # plain names: no "~" escapes in pyhf's
        target = target[part]
    return _inline_refs(target, target_document, documents, (*seen, (target_document, pointer)))


def _content_digest(plain: Any) -> str | None:
    """SHA-256 of the canonical JSON text (sorted keys, no spaces) of ``plain``; ``None`` when
    it is not JSON (then it is validated every time, and the schema names the problem)."""
    try:
        text = json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _check_modifier_types(spec: Any, source: str) -> None:
    """Before the schema (whose anyOf would hide it): a missing or unknown modifier type."""
    channels = spec.get("channels") if isinstance(spec, Mapping) else None
    for ci, channel in enumerate(channels if isinstance(channels, list) else []):
        samples = channel.get("samples") if isinstance(channel, Mapping) else None
        for si, sample in enumerate(samples if isinstance(samples, list) else []):
            mods = sample.get("modifiers") if isinstance(sample, Mapping) else None
            for mi, mod in enumerate(mods if isinstance(mods, list) else []):
                path = f"channels[{ci}].samples[{si}].modifiers[{mi}]"
                if not isinstance(mod, Mapping):
                    continue
                if "type" not in mod:
                    raise ConfigError(f"{source}: {path}: 'type' is a required property")
                if mod["type"] not in MODIFIER_TYPES:
                    raise ConfigError(
                        f"{source}: {path}: unknown modifier type '{mod['type']}'; valid types: "
                        f"{', '.join(MODIFIER_TYPES)}"
                    )


def _format_path(parts: Sequence[Any]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return text.lstrip(".")


def _schema_message(error: jsonschema.ValidationError, source: str) -> str:
    if error.validator == "anyOf" and error.context:
        # modifiers: keep the errors of the branch whose 'type' matches
        branches: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.schema_path[0], []).append(sub)
        matching = [
            errs
            for errs in branches.values()
            if not any(
                e.validator == "const" and list(e.path)[-1:] in (["type"], ["name"]) for e in errs
            )
        ]
        candidates = matching[0] if len(matching) == 1 else list(error.context)
        import jsonschema.exceptions

        error = jsonschema.exceptions.best_match(candidates)
    path = _format_path(list(error.absolute_path))
    message = error.message.replace("\n", " ")
    return f"{source}: {path}: {message}" if path else f"{source}: {message}"


def _check_semantics(spec: Mapping[str, Any], source: str) -> None:
    names = [c["name"] for c in spec["channels"]]
    _unique(names, f"{source}: channel", "channels")
    _unique([m["name"] for m in spec["measurements"]], f"{source}: measurement", "measurements")
    observed = {}
    for oi, obs in enumerate(spec["observations"]):
        if obs["name"] in observed:
            raise ConfigError(
                f"{source}: observations[{oi}]: duplicate observation '{obs['name']}'"
            )
        observed[obs["name"]] = len(obs["data"])
    for ci, channel in enumerate(spec["channels"]):
        nbins = len(channel["samples"][0]["data"])
        path = f"channels[{ci}]"
        _unique([s["name"] for s in channel["samples"]], f"{source}: {path}: sample", "samples")
        for si, sample in enumerate(channel["samples"]):
            spath = f"{path}.samples[{si}]"
            _length(sample["data"], nbins, f"{source}: {spath}.data")
            for mi, mod in enumerate(sample["modifiers"]):
                mpath = f"{spath}.modifiers[{mi}].data"
                data = mod["data"]
                if mod["type"] == "histosys":
                    _length(data["lo_data"], nbins, f"{source}: {mpath}.lo_data")
                    _length(data["hi_data"], nbins, f"{source}: {mpath}.hi_data")
                elif mod["type"] in ("staterror", "shapesys"):
                    _length(data, nbins, f"{source}: {mpath}")
        if channel["name"] not in observed:
            raise ConfigError(f"{source}: {path}: no observation for channel '{channel['name']}'")
        if observed[channel["name"]] != nbins:
            raise ConfigError(
                f"{source}: observation of channel '{channel['name']}' has "
                f"{observed[channel['name']]} bins, its samples {nbins}"
            )


def _unique(values: list[str], what: str, plural: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"{what} name '{value}' is used twice; {plural} need unique names")
        seen.add(value)


def _length(values: list, nbins: int, where: str) -> None:
    if len(values) != nbins:
        raise ConfigError(f"{where}: {len(values)} values but the channel has {nbins} bins")


# ---------------------------------------------------------------------- readers
def _read_json(path: pathlib.Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot be read ({exc})") from None


def _xml_rootdir(path: pathlib.Path) -> pathlib.Path:
    try:
        inputs = [e.text.strip() for e in ET.parse(path).getroot().findall("Input") if e.text]
    except ET.ParseError as exc:
        raise ConfigError(f"{path}: not valid XML ({exc})") from None
    candidates = [path.parent, path.parent.parent, pathlib.Path.cwd()]
    for rootdir in candidates:
        if all((rootdir / name).is_file() for name in inputs):
            return rootdir
    missing = inputs[0] if inputs else "?"
    raise InputFileError(
        f"{path}: <Input> {missing} not found relative to {path.parent}, {path.parent.parent} "
        "or the current directory"
    )


def _read_xml(path: pathlib.Path) -> dict:
    import pyhf.exceptions
    import pyhf.readxml

    rootdir = _xml_rootdir(path)
    try:
        return pyhf.readxml.parse(path, rootdir)
    except pyhf.exceptions.InvalidSpecification as exc:
        raise ConfigError(_schema_message(exc.parent, str(path))) from None
    except KeyError as exc:
        raise MissingObjectError(f"{path}: {exc.args[0] if exc.args else exc}") from None
    except ET.ParseError as exc:
        raise ConfigError(f"{path}: an <Input> file is not valid XML ({exc})") from None
    except OSError as exc:
        raise InputFileError(f"{path}: {exc}") from None
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        _close_xml_cache()


def _close_xml_cache() -> None:
    """pyhf.readxml caches open ROOT files in a module global; close and drop them."""
    import pyhf.readxml

    cache = getattr(pyhf.readxml, "__FILECACHE__", {})
    for handle, _ in list(cache.values()):
        close = getattr(handle, "close", None)
        if close is not None:
            close()
    pyhf.readxml.clear_filecache()


def _patch_file_ops(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise InputFileError(f"{path}: no such patch file")
    ops = _read_json(path)
    error = next(pyhf_schema("jsonpatch.json").iter_errors(ops), None)
    if error is not None:
        raise ConfigError(_schema_message(error, f"{path} (JSON Patch)"))
    return ops


def _patchset_ops(path: pathlib.Path, name: str, workspace: Workspace) -> tuple[list, str]:
    import pyhf
    import pyhf.exceptions

    spec = _read_json(path)
    try:
        patchset = pyhf.PatchSet(spec)
    except pyhf.exceptions.InvalidSpecification as exc:
        raise ConfigError(_schema_message(exc.parent, f"{path} (patchset)")) from None
    except pyhf.exceptions.InvalidPatchSet as exc:
        raise ConfigError(f"{path}: {exc}") from None
    names = [p.name for p in patchset.patches]
    if name not in names:
        raise ConfigError(f"{path}: no patch named '{name}'; valid names: {', '.join(names)}")
    try:
        patchset.verify(workspace.to_json())
    except pyhf.exceptions.PatchSetVerificationError as exc:
        raise ConfigError(
            f"{path}: patchset was made for a different workspace than {workspace.source} ({exc})"
        ) from None
    return copy.deepcopy(patchset[name].patch), f"{path}:{name}"
