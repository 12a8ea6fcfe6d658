"""The ``diffana`` command line (contract in DESIGN.md).

Every command takes ``--output FILE`` (JSON; stdout when absent), ``--device auto|cpu|cuda[:N]``
and ``-v/--verbose``. Exit codes: 0 success, 2 user error (one line on stderr naming the file,
field or branch; no traceback), 1 internal error. Outputs are written atomically.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import json
import logging
import pathlib
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import click

from analysis.errors import AnalysisError
from analysis.files import check_writable, json_text, write_atomically

log = logging.getLogger("analysis")


class _LazyModule:
    """Stands for the module ``name``, imported on first attribute access.

    Start-up time: importing torch takes about 3 s, which ``diffana --help``, ``--version``,
    argument errors and ``validate`` do not need. Every other heavy import of the CLI is inside
    the command that needs it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attribute)


if TYPE_CHECKING:
    import torch
else:
    torch = _LazyModule("torch")


ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)
"""Operating-system faults that are the user's to fix (permissions, a full disk, a path through
a regular file): reported like user errors even when they come from a write outside
:func:`analysis.files.write_atomically` (the ROOT files of ``generate``)."""


class _Group(click.Group):
    """Turns user-input errors into one line on stderr and exit code 2: every
    :class:`~analysis.errors.AnalysisError` (its message names the file and the problem; output
    faults are :class:`~analysis.errors.OutputError`), and an ``OSError`` in
    :data:`ENVIRONMENT_ERRNOS` (``"<file>: <reason>"``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AnalysisError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(2)
        except OSError as err:
            if err.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{err.filename}: " if err.filename is not None else ""
            click.echo(f"Error: {where}{err.strerror or err}", err=True)
            ctx.exit(2)


DEVICE_PATTERN = re.compile(r"auto|(cpu|cuda)(:\d+)?")
"""The ``--device`` values, checked when the command line is read (without importing torch)."""


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not DEVICE_PATTERN.fullmatch(value):
        raise click.BadParameter(f"'{value}' is not a device; expected auto, cpu or cuda[:N]")
    return value


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_check_device,
    help="auto, cpu or cuda[:N].",
)
"""``--device``: checked for its form here, resolved by :func:`resolve_device`."""

threads_option = click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Intra-op CPU threads of torch. Likelihood tensors are small; more threads only "
    "contend; use --threads 0 for torch's default.",
)
"""``--threads``: applied by :func:`set_threads`."""


def set_threads(count: int) -> None:
    """The CLI's thread policy: ``torch.set_num_threads(count)``; 0 keeps torch's default.

    One thread by default: the tensors of a likelihood fit (hundreds of bins and parameters)
    are too small to share out: torch's default (one thread per core) made the fit of
    cabinetry's example workspace 1.7x slower on a loaded 2-core machine (up to 4x in other
    fits; ``benchmarks/bench_startup.py``). Only the CLI sets this process-wide state, never
    the library.
    """
    if count > 0:
        torch.set_num_threads(count)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(
            f"'{name}' is not a device; expected auto, cpu or cuda[:N]"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"'{name}': expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"'{name}': CUDA is not available on this machine")
    return device


LIMIT_SCAN_POINTS = 31
"""POI values from 0 to 1.5 times the largest limit at which ``diffana limit`` reports CLs."""


def emit(result: Any, output: pathlib.Path | None) -> None:
    """Print ``result`` as JSON to stdout, or write it to ``output``."""
    text = json_text(result)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomically(output, text)
        click.echo(f"wrote {output}", err=True)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--output``, ``--device``, ``--threads`` and ``-v``; passes ``output`` on, and
    ``device`` (resolved by :func:`resolve_device`, after :func:`set_threads`) when the
    command's function takes one.

    A command without a ``device`` parameter computes nothing with torch (``validate``,
    ``generate``): it never imports torch, its ``--device`` is checked for its form only and
    ``--threads`` does nothing.
    """
    takes_device = "device" in inspect.signature(func).parameters

    @click.option(
        "--output",
        "-o",
        type=click.Path(dir_okay=False, path_type=pathlib.Path),
        default=None,
        help="JSON output file (default: stdout).",
    )
    @device_option
    @threads_option
    @click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        output: pathlib.Path | None,
        device: str,
        threads: int,
        verbose: int,
        **kwargs: Any,
    ) -> Any:
        _setup_logging(verbose)
        if takes_device:
            set_threads(threads)
            kwargs["device"] = resolve_device(device)
        return func(*args, output=output, **kwargs)

    return wrapper


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``CONFIG``, ``--cuts`` and the column cache settings."""

    @click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=pathlib.Path))
    @click.option(
        "--cuts",
        type=click.Path(path_type=pathlib.Path),
        default=None,
        help="cuts.json (cut name -> value) replacing the configured cut values.",
    )
    @click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=pathlib.Path),
        default=None,
        help="Column cache (default: $DIFFANA_CACHE_DIR or ~/.cache/diffana).",
    )
    @click.option("--no-cache", is_flag=True, help="Read the ROOT files even if cached.")
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        config_path: pathlib.Path,
        cuts: pathlib.Path | None,
        cache_dir: pathlib.Path | None,
        no_cache: bool,
        **kwargs: Any,
    ) -> Any:
        from analysis import config as configuration
        from analysis.io import default_cache_dir

        start = configuration.load(config_path)
        cfg = start if cuts is None else configuration.load_cuts(cuts, start)
        cache = None if no_cache else (cache_dir or default_cache_dir())
        if "start_config" in inspect.signature(func).parameters:  # the config before --cuts
            kwargs["start_config"] = start
        return func(*args, config=cfg, cache_dir=cache, **kwargs)

    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffana")
def main() -> None:
    """diffana: a differentiable statistical-analysis pipeline for HEP on PyTorch."""


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default=pathlib.Path("data/generated"),
    show_default=True,
    help="Output folder.",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=200_000,
    show_default=True,
    help="Number of MC events, shared among the samples.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option(
    "--lumi",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Integrated luminosity in fb^-1 (default: the generator's).",
)
@common_options
def generate(
    out_dir: pathlib.Path,
    events: int,
    seed: int,
    lumi: float | None,
    output: pathlib.Path | None,
) -> None:
    """Generate the demo dimuon-resonance ROOT files."""
    from analysis import generate as generator

    kwargs: dict[str, Any] = {} if lumi is None else {"lumi": lumi}
    paths = generator.generate(out_dir, events=events, seed=seed, **kwargs)
    emit({"files": [str(p) for p in paths]}, output)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=pathlib.Path))
@common_options
def validate(config_path: pathlib.Path, output: pathlib.Path | None) -> None:
    """Validate an analysis configuration (schema and semantics)."""
    from analysis import config as configuration

    configuration.load(config_path)
    emit({"valid": True}, output)


@main.command()
@config_options
@common_options
def histograms(
    config: Any, cache_dir: pathlib.Path | None, output: pathlib.Path | None, device: torch.device
) -> None:
    """Hard histograms (edges, yields, sumw2) per region, sample and variation."""
    from analysis.histograms import hard_histograms, histograms_to_dict

    emit(histograms_to_dict(hard_histograms(config, device=device, cache_dir=cache_dir)), output)


@main.command()
@config_options
@common_options
def workspace(
    config: Any, cache_dir: pathlib.Path | None, output: pathlib.Path | None, device: torch.device
) -> None:
    """Build the pyhf JSON workspace of an analysis (hard cuts)."""
    from analysis import workspace as ws
    from analysis.histograms import hard_histograms

    emit(ws.build(config, hard_histograms(config, device=device, cache_dir=cache_dir)), output)


# ----------------------------------------------------------------------------- statistics
# The statistics commands share INPUT handling (input_options) and check what a user can get
# wrong before any fit runs: parameter names in --fix, --minos and --parameter, a POI where the
# command needs one, a POI value within its bounds, a finite likelihood at the start point.
# A singular or indefinite Hessian is not a refusal: significance, CLs, limits and scans need
# profiled likelihood values only, and fit reports the uncertainties it cannot compute as null.
# They run under torch.no_grad(): the CLI wants numbers, not graphs (the fits switch autograd
# on where they need derivatives).


def input_options(*, needs_poi: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``INPUT`` (pyhf JSON workspace, HistFactory XML or analysis YAML) and its options.

    Passes ``workspace`` and ``model`` on, and runs the command without autograd graphs. Goes
    below :func:`common_options` (which resolves ``--device`` and sets up logging first).
    ``needs_poi``: the command needs the measurement's POI; the others (fit, scan) also run on
    a measurement without one. Errors from the command that do not name the input get its name
    in front.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @click.argument("input_path", metavar="INPUT", type=click.Path(path_type=pathlib.Path))
        @click.option(
            "--patch",
            "patches",
            multiple=True,
            help="JSON Patch file, or PATCHSET.json:NAME (pyhf patchset); repeatable.",
        )
        @click.option("--measurement", default=None, help="Measurement name (default: the first).")
        @click.option(
            "--cuts",
            type=click.Path(path_type=pathlib.Path),
            default=None,
            help="cuts.json for an analysis YAML INPUT.",
        )
        @click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=pathlib.Path),
            default=None,
            help="Column cache for an analysis YAML INPUT (default: $DIFFANA_CACHE_DIR or "
            "~/.cache/diffana).",
        )
        @click.option("--no-cache", is_flag=True, help="Read the ROOT files even if cached.")
        @functools.wraps(func)
        def wrapper(
            *args: Any,
            input_path: pathlib.Path,
            patches: tuple[str, ...],
            measurement: str | None,
            cuts: pathlib.Path | None,
            cache_dir: pathlib.Path | None,
            no_cache: bool,
            device: torch.device,
            **kwargs: Any,
        ) -> Any:
            from analysis.cache import default_cache_dir  # not analysis.io: awkward, uproot

            cache = None if no_cache else (cache_dir or default_cache_dir())
            workspace = load_workspace(
                input_path, patches, cuts=cuts, cache_dir=cache, device=device
            )
            model = _model(workspace, measurement, device, needs_poi)
            try:
                with torch.no_grad():
                    return func(*args, workspace=workspace, model=model, device=device, **kwargs)
            except AnalysisError as err:
                if workspace.source in str(err):
                    raise
                message = f"{workspace.source}: {err}"
                try:
                    named = type(err)(message)
                except TypeError:  # a subclass with another signature: keep the message
                    named = AnalysisError(message)
                raise named from None

        return wrapper

    return decorate


def load_workspace(
    input_path: pathlib.Path,
    patches: tuple[str, ...] = (),
    *,
    cuts: pathlib.Path | None = None,
    cache_dir: pathlib.Path | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """A :class:`~analysis.likelihood.Workspace` from a JSON workspace, XML or analysis YAML.

    An analysis YAML is turned into its workspace with hard cuts (as ``diffana workspace``),
    reading its ROOT files through the column cache in ``cache_dir`` (``None``: no cache).
    """
    from analysis.likelihood import Workspace

    if input_path.suffix.lower() in (".yaml", ".yml"):
        import dataclasses

        from analysis import config as configuration
        from analysis import workspace as builder
        from analysis.histograms import hard_histograms

        cfg = configuration.load(input_path)
        if cuts is not None:
            cfg = configuration.load_cuts(cuts, cfg)
        histograms = hard_histograms(cfg, device=device, cache_dir=cache_dir)
        workspace = Workspace.load(builder.build(cfg, histograms), patches)
        return dataclasses.replace(workspace, source=str(input_path))
    return Workspace.load(input_path, patches)


def _model(workspace: Any, measurement: str | None, device: torch.device, needs_poi: bool) -> Any:
    """The measurement's model; one without POI when it has none and the command needs none."""
    from analysis.errors import ConfigError

    meas = workspace.measurement(measurement)
    if meas["config"].get("poi"):
        return workspace.model(meas["name"], device=device)
    if needs_poi:
        command = click.get_current_context().info_name
        raise ConfigError(
            f"{workspace.source}: measurement '{meas['name']}' has no POI (its config.poi is "
            f"empty); diffana {command} needs a parameter of interest"
        )
    return workspace.model(meas["name"], poi_name="", device=device)


def _data(workspace: Any, model: Any, asimov: bool) -> torch.Tensor:
    """Observed data (+ auxdata), or the Asimov dataset at the suggested initial parameters."""
    if asimov:
        return model.expected_data(model.suggested_init())
    return workspace.data(model)


def _parameter_list(model: Any, limit: int = 30) -> str:
    names = list(model.par_names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _unknown_parameter(model: Any, option: str, name: str) -> Exception:
    import difflib

    from analysis.errors import ConfigError

    close = difflib.get_close_matches(name, [*model.par_names, *model.par_slices], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"{option}: unknown parameter '{name}'{hint}; parameters: {_parameter_list(model)}"
    )


def _parameter_index(model: Any, option: str, name: str) -> int:
    """Index of parameter ``name`` (as in ``model.par_names``), or a ConfigError."""
    if name not in model.par_names:
        raise _unknown_parameter(model, option, name)
    return model.par_names.index(name)


def _fixed_settings(
    model: Any, fix: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Initial values and fixed mask with ``--fix NAME=VALUE`` applied (a name or a set name),
    and the fixed values by name."""
    import math

    from analysis.errors import ConfigError

    init, fixed = model.suggested_init().clone(), model.suggested_fixed().clone()
    values: dict[str, float] = {}
    for item in fix:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise ConfigError(f"--fix {item!r}: expected NAME=VALUE, e.g. --fix mu=1")
        if not math.isfinite(number):
            raise ConfigError(f"--fix {item!r}: the value must be a finite number")
        if name in model.par_names:
            index: Any = model.par_names.index(name)
        elif name in model.par_slices:
            index = model.par_slices[name]
        else:
            raise _unknown_parameter(model, f"--fix {item!r}", name)
        init[index] = number
        fixed[index] = True
        values[name] = number
    return init, fixed, values


def _check_start(
    workspace: Any,
    model: Any,
    data: torch.Tensor,
    init: torch.Tensor,
    *,
    asimov: bool = False,
    fixed_values: dict[str, float] | None = None,
    fixed_by: str = "--fix",
) -> None:
    """FitError (DataError for bad data) saying why twice_nll is not finite at ``init``.

    Names the first bin with a non-finite or negative count, or with an expected yield that is
    not finite, negative, or 0 where events are observed (with each sample's share), and what
    causes it: the ``fixed_values`` (set by the option ``fixed_by``) that make it finite when
    put back to their suggested values, a normsys with a factor <= 0, a negative nominal
    yield, or else the modifiers of the offending samples.
    """
    import math

    from analysis.errors import DataError
    from analysis.fit import FitError

    value = float(model.twice_nll(init, data))
    if math.isfinite(value):
        return
    source, fixed_values = workspace.source, fixed_values or {}
    where = [(c, b) for c in model.channels for b in range(model.channel_nbins[c])]
    main = data[: model.nmain]
    bad_data = ~torch.isfinite(main) | (main < 0)
    if not asimov and bool(bad_data.any()):  # Asimov data are the model's: see below
        k = int(torch.nonzero(bad_data)[0])
        channel, b = where[k]
        raise DataError(
            f"{source}: observed data of channel '{channel}' bin {b} is {float(main[k]):g}; "
            "counts must be finite and >= 0"
        )
    lam = model.expected_actualdata(init)
    bad = ~torch.isfinite(lam) | (lam < 0) | ((lam == 0) & (main > 0))
    if not bool(bad.any()):
        detail, samples = "the constraint terms are not finite", []
        channel, b = "", 0
    else:
        k = int(torch.nonzero(bad)[0])
        channel, b = where[k]
        shares = model.expected_by_sample(init)[..., k]
        samples = [
            s
            for s, y in zip(model.samples, shares.tolist(), strict=True)
            if not math.isfinite(y) or y < 0
        ]
        parts = ", ".join(
            f"{s} {y:.6g}" for s, y in zip(model.samples, shares.tolist(), strict=True) if y != 0
        )
        detail = f"channel '{channel}' bin {b} expects {float(lam[k]):.6g} events ({parts})"
    causes = []
    for name, number in fixed_values.items():
        trial = init.clone()
        index = model.par_slices[name] if name in model.par_slices else model.par_names.index(name)
        trial[index] = model.suggested_init()[index]
        if math.isfinite(float(model.twice_nll(trial, data))):
            causes.append(f"{name}={number:g} (from {fixed_by})")
    if not causes:
        causes = _suspect_modifiers(workspace.spec, channel, b, samples)
    blame = f"; caused by {', '.join(causes)}" if causes else ""
    raise FitError(f"{source}: twice_nll is {value} at the start point: {detail}{blame}")


def _suspect_modifiers(spec: dict, channel: str, bin_index: int, samples: list[str]) -> list[str]:
    """What in the spec makes ``samples`` non-finite or negative in ``channel`` bin
    ``bin_index``: a normsys factor <= 0 (anywhere), a negative nominal yield, or else the
    samples' modifiers."""
    nonpositive, negative, listed = [], [], []
    for ch in spec["channels"]:
        for sample in ch["samples"]:
            mine = ch["name"] == channel and sample["name"] in samples
            if mine and float(sample["data"][bin_index]) < 0:
                negative.append(
                    f"the nominal yield {float(sample['data'][bin_index]):g} of sample "
                    f"'{sample['name']}'"
                )
            for mod in sample["modifiers"]:
                if mod["type"] == "normsys":
                    lo, hi = float(mod["data"]["lo"]), float(mod["data"]["hi"])
                    if min(lo, hi) <= 0:
                        nonpositive.append(
                            f"normsys '{mod['name']}' of sample '{sample['name']}' in channel "
                            f"'{ch['name']}' (hi {hi:g}, lo {lo:g}; factors must be > 0)"
                        )
                if mine:
                    listed.append(f"{mod['name']} ({mod['type']})")
    if nonpositive or negative:
        return nonpositive + negative
    return [f"one of the modifiers {', '.join(listed)}"] if listed else []


#: twice-NLL difference above which a Newton minimum counts as a different (lower) minimum
#: than MIGRAD's, not as MIGRAD's tolerance (its EDM goal is 2e-5 at cabinetry's settings)
DIFFERENT_MINIMUM = 1e-3


def _global_fit(
    model: Any, data: torch.Tensor, init: torch.Tensor, fixed: torch.Tensor, minos: tuple[str, ...]
) -> Any:
    """MIGRAD + HESSE from the init (cabinetry's and pyhf's numbers), checked against the
    batched Newton minimum (multi-started on kinked parameters): where Newton finds a lower
    minimum, MIGRAD stopped in a local one and is run again from Newton's point."""
    from analysis import fit as fitting
    from analysis import inference

    def migrad(start: torch.Tensor) -> Any:
        return fitting.fit_model(model, data, init=start, fixed=fixed, minos=minos)

    result = migrad(init)
    newton, newton_nll = inference.free_fit(model, data, init=init, fixed=fixed)
    if float(newton_nll) < float(result.twice_nll) - DIFFERENT_MINIMUM:
        log.info(
            "MIGRAD stopped at twice NLL %.6f, Newton found %.6f: refitting from there",
            float(result.twice_nll),
            float(newton_nll),
        )
        result = migrad(newton)
    return result


@main.command()
@common_options
@input_options(needs_poi=False)
@click.option("--asimov", is_flag=True, help="Fit the Asimov dataset (pre-fit expectation).")
@click.option("--minos", multiple=True, help="Run MINOS for this parameter; repeatable.")
@click.option(
    "--fix",
    multiple=True,
    help="Fix a parameter (or every parameter of a set, e.g. a staterror): NAME=VALUE; repeatable.",
)
def fit(
    workspace: Any,
    model: Any,
    asimov: bool,
    minos: tuple[str, ...],
    fix: tuple[str, ...],
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Maximum-likelihood fit (MIGRAD + HESSE, optional MINOS)."""
    from analysis.errors import ConfigError

    data = _data(workspace, model, asimov)
    init, fixed, fixed_values = _fixed_settings(model, fix)
    for name in minos:
        if bool(fixed[_parameter_index(model, "--minos", name)]):
            raise ConfigError(
                f"--minos {name}: the parameter is fixed (by --fix or the measurement)"
            )
    _check_start(workspace, model, data, init, asimov=asimov, fixed_values=fixed_values)
    result = _global_fit(model, data, init, fixed, minos)
    emit(result.to_dict(), output)


@main.command()
@common_options
@input_options(needs_poi=True)
@click.option("--poi-value", type=float, required=True, help="POI value to test.")
@click.option(
    "--test-stat",
    type=click.Choice(["q", "qtilde", "q0"]),
    default="qtilde",
    show_default=True,
    help="Test statistic (q0: discovery, at --poi-value 0).",
)
@click.option("--asimov", is_flag=True, help="Test on the Asimov dataset instead of the data.")
@click.option(
    "--calctype",
    type=click.Choice(["asymptotics", "toybased"]),
    default="asymptotics",
    show_default=True,
    help="Asymptotic formulae or pseudo-experiments (as pyhf's calctype).",
)
@click.option(
    "--n-toys",
    type=click.IntRange(min=10),
    default=2000,
    show_default=True,
    help="Pseudo-experiments per hypothesis (toybased).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Toy seed (toybased).")
def hypotest(
    workspace: Any,
    model: Any,
    poi_value: float,
    test_stat: Literal["q", "qtilde", "q0"],
    asimov: bool,
    calctype: str,
    n_toys: int,
    seed: int,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """CLs hypothesis test at one POI value, asymptotic or with toys.

    Output: ``test_stat`` is the statistic's name, ``teststat`` its observed value; for q0,
    ``cls_obs`` and ``cls_exp`` are discovery p-values (CLs+b). Toys: ``n_toys`` and ``seed``
    too, and a progress bar on a terminal.
    """
    from analysis import inference
    from analysis.errors import ConfigError

    low, high = (float(b) for b in model.suggested_bounds()[model.poi_index])
    if not low <= poi_value <= high:
        raise ConfigError(
            f"--poi-value {poi_value:g} is outside the bounds [{low:g}, {high:g}] of the POI "
            f"'{model.poi_name}'"
        )
    if test_stat == "q0" and poi_value != 0:
        raise ConfigError(
            f"--test-stat q0 tests the background-only hypothesis: --poi-value must be 0, got "
            f"{poi_value:g} (or use diffana significance)"
        )
    data = _data(workspace, model, asimov)
    _check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    if calctype == "toybased":
        result = inference.toy_hypotest(
            model, data, poi_value, test_stat, n_toys=n_toys, seed=seed, progress=True
        )
        toys = {"calctype": calctype, "n_toys": n_toys, "seed": seed}
    else:
        result, toys = inference.hypotest(model, data, poi_value, test_stat), {}
    emit(
        {
            "poi_value": poi_value,
            "test_stat": test_stat,
            "teststat": float(result.teststat),
            "cls_obs": float(result.cls_obs),
            "cls_exp": [float(x) for x in result.cls_exp],
            **toys,
        },
        output,
    )


@main.command()
@common_options
@input_options(needs_poi=True)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
def significance(
    workspace: Any, model: Any, asimov: bool, output: pathlib.Path | None, device: torch.device
) -> None:
    """Discovery p-value and significance (observed and expected)."""
    from analysis import inference

    data = _data(workspace, model, asimov)
    _check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    result = inference.significance(model, data)
    emit(
        {
            "observed": {
                "p_value": float(result.observed_p_value),
                "significance": float(result.observed_significance),
            },
            "expected": {
                "p_value": float(result.expected_p_value),
                "significance": float(result.expected_significance),
            },
        },
        output,
    )


@main.command()
@common_options
@input_options(needs_poi=True)
@click.option(
    "--cl",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Confidence level.",
)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
def limit(
    workspace: Any,
    model: Any,
    cl: float,
    asimov: bool,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Observed and expected CLs upper limits on the POI (expected: -2 sigma .. +2 sigma)."""
    from analysis import inference

    data = _data(workspace, model, asimov)
    _check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    result = inference.upper_limit(model, data, cl=cl)
    # CLs on a POI grid through every limit (pyhf's upper_limit return_results): the Brazil plot
    poi_high = float(model.suggested_bounds()[model.poi_index, 1])
    top = min(1.5 * max(result.observed, *result.expected), poi_high)
    grid = torch.linspace(0.0, top, LIMIT_SCAN_POINTS, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        curve = inference.hypotest(model, data, grid)
    emit(
        {
            "cl": cl,
            "observed": float(result.observed),
            "expected": [float(x) for x in result.expected],
            "scan": {
                "poi_values": curve.poi_value.tolist(),
                "cls_obs": curve.cls_obs.tolist(),
                "cls_exp": curve.cls_exp.tolist(),
            },
        },
        output,
    )


@main.command()
@common_options
@input_options(needs_poi=False)
@click.option("--parameter", required=True, help="Parameter to scan (default range: +-2 sigma).")
@click.option("--range", "scan_range", type=(float, float), default=None, help="LOW HIGH.")
@click.option("--steps", type=click.IntRange(min=2), default=11, show_default=True)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
def scan(
    workspace: Any,
    model: Any,
    parameter: str,
    scan_range: tuple[float, float] | None,
    steps: int,
    asimov: bool,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Profile-likelihood scan of one parameter: twice NLL minus its minimum at each value."""
    from analysis import inference

    index = _parameter_index(model, "--parameter", parameter)
    data = _data(workspace, model, asimov)
    init = model.suggested_init()
    _check_start(workspace, model, data, init, asimov=asimov)
    values = None
    if scan_range is not None:
        values = torch.linspace(*scan_range, steps, dtype=model.dtype, device=model.device)
        starts = init.expand(steps, -1).clone()
        starts[:, index] = values
        bad = ~torch.isfinite(model.twice_nll(starts, data))
        if bool(bad.any()):
            _check_start(
                workspace,
                model,
                data,
                starts[bad][0],
                asimov=asimov,
                fixed_values={parameter: float(values[bad][0])},
                fixed_by="--range",
            )
    result = inference.scan(model, data, parameter, values, n_steps=steps)
    emit(result.to_dict(), output)


@main.command()
@common_options
@input_options(needs_poi=True)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
def ranking(
    workspace: Any, model: Any, asimov: bool, output: pathlib.Path | None, device: torch.device
) -> None:
    """Pre- and post-fit impact of each nuisance parameter on the POI.

    Output: ``poi`` and ``ranking``, one entry per nuisance parameter (in parameter order) with
    its ``name``, ``bestfit``, ``uncertainty`` (post-fit) and the POI shifts ``prefit_up``,
    ``prefit_down``, ``postfit_up``, ``postfit_down`` when it is fixed at its best fit +- its
    pre-fit (constraint) or post-fit uncertainty and the rest refitted; 0 for unconstrained
    parameters' pre-fit impacts and for fixed parameters.
    """
    from analysis import inference

    data = _data(workspace, model, asimov)
    _check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    best = _global_fit(model, data, model.suggested_init(), model.suggested_fixed(), ())
    result = inference.ranking(model, data, best)
    emit({"poi": model.poi_name, **result.to_dict()}, output)


# ----------------------------------------------------------------------------- optimization
def _out_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=pathlib.Path),
        required=True,
        help="Folder for result.json and cuts.json (and checkpoint.pt).",
    )(func)


@main.command()
@config_options
@common_options
def cutflow(
    config: Any,
    start_config: Any,
    cache_dir: pathlib.Path | None,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Hard cut flow per region and sample: events, yields and their uncertainty after each cut.

    Output: ``start`` (region -> cut flow at the configured cuts) and, with ``--cuts``,
    ``optimized`` (the same at those cuts) and ``cuts`` (starting against optimized values).
    """
    from analysis import cutflow as flows
    from analysis.io import read_events

    templates = [t for t in start_config.templates() if t.variation == "nominal"]
    events = read_events(start_config, templates, device=device, cache_dir=cache_dir)
    result: dict[str, Any] = {
        "start": {r: f.to_dict() for r, f in flows.cut_flow(start_config, events).items()}
    }
    if config is not start_config:
        result["optimized"] = {r: f.to_dict() for r, f in flows.cut_flow(config, events).items()}
        result["cuts"] = flows.cut_comparison(start_config, config.cut_values())
    emit(result, output)


def _report_outputs(out_dir: pathlib.Path) -> None:
    from analysis.optimize import CUTS, RESULT

    click.echo(f"wrote {out_dir / RESULT} and {out_dir / CUTS}", err=True)


@main.command()
@config_options
@common_options
@_out_option
@click.option("--objective", default=None, help="Objective name (default: the config's).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Number of Adam steps.")
@click.option("--seed", type=int, default=None, help="Random seed (default: the config's).")
@click.option("--resume", is_flag=True, help="Continue from DIR/checkpoint.pt.")
def optimize(
    config: Any,
    cache_dir: pathlib.Path | None,
    out_dir: pathlib.Path,
    objective: str | None,
    steps: int | None,
    seed: int | None,
    resume: bool,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Optimize the trainable cuts by gradient descent (writes DIR/result.json, DIR/cuts.json).

    Fails at once (exit 2) when DIR or --output cannot be written or another run is using DIR.
    DIR/result.json is written last: while it is absent the run has not finished.
    """
    from analysis import optimize as optimization

    if output is not None:
        check_writable(output)
    result = optimization.optimize(
        config,
        out_dir=out_dir,
        objective=objective,
        steps=steps,
        seed=seed,
        resume=resume,
        device=device,
        cache_dir=cache_dir,
    )
    _report_outputs(out_dir)
    emit(result.to_dict(), output)


@main.command("scan-cuts")
@config_options
@common_options
@_out_option
@click.option("--method", type=click.Choice(["grid", "random"]), required=True)
@click.option("--budget", type=click.IntRange(min=1), required=True, help="Hard evaluations.")
@click.option("--objective", default=None, help="Objective name (default: the config's).")
@click.option("--seed", type=int, default=None, help="Random seed (default: the config's).")
def scan_cuts(
    config: Any,
    cache_dir: pathlib.Path | None,
    out_dir: pathlib.Path,
    method: Literal["grid", "random"],
    budget: int,
    objective: str | None,
    seed: int | None,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Grid or random search of the trainable cuts, hard evaluations only (the baseline).

    Fails at once (exit 2) when DIR or --output cannot be written or another run is using DIR.
    DIR/result.json is written last: while it is absent the run has not finished.
    """
    from analysis import optimize as optimization

    if output is not None:
        check_writable(output)
    result = optimization.scan_cuts(
        config,
        method=method,
        budget=budget,
        out_dir=out_dir,
        objective=objective,
        seed=seed,
        device=device,
        cache_dir=cache_dir,
    )
    _report_outputs(out_dir)
    emit(result.to_dict(), output)


# ----------------------------------------------------------------------------- plots
@main.group()
def plot() -> None:
    """Figures from result files: each subcommand writes OUT.png and OUT.pdf."""


def _plot_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--out STEM`` (writes STEM.png and STEM.pdf) and ``-v``."""

    @click.option(
        "--out",
        "stem",
        type=click.Path(dir_okay=False, path_type=pathlib.Path),
        required=True,
        help="Output path without suffix: STEM.png and STEM.pdf are written.",
    )
    @click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int, **kwargs: Any) -> Any:
        _setup_logging(verbose)
        return func(*args, **kwargs)

    return wrapper


def _read_json(
    path: pathlib.Path,
    what: str,
    keys: tuple[str, ...] = (),
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A result file written by a diffana command, with its top-level ``keys`` checked, and
    ``parse(payload)`` (the record or figure made from it) when given: a payload it cannot
    read (a missing key, a wrong type or length) is a ConfigError naming the file."""
    from analysis.errors import ConfigError, InputFileError

    if not path.is_file():
        raise InputFileError(f"{path}: {what} file not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    missing = [key for key in keys if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise ConfigError(f"{path}: not a {what} file (no {', '.join(map(repr, missing))})")
    if parse is None:
        return payload
    try:
        return parse(payload)
    except AnalysisError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        problem = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"{path}: not a valid {what} file: {problem}") from None


def _save(figure: Any, stem: pathlib.Path) -> None:
    from analysis.plotting import save_figure

    paths = save_figure(figure, stem)
    click.echo("wrote " + " and ".join(str(p) for p in paths), err=True)


_json_file = click.Path(dir_okay=False, path_type=pathlib.Path)
FIT_KEYS = ("labels", "bestfit", "uncertainty", "corr_mat", "twice_nll")
"""What a ``diffana fit`` file must hold for the plots."""


def _regions(config_path: pathlib.Path | None) -> tuple[Any, ...]:
    """The regions of the analysis YAML ``--config`` (none without it): binning, observable."""
    if config_path is None:
        return ()
    from analysis import config as configuration

    return configuration.load(config_path).regions


@plot.command("distributions")
@click.argument("workspace_path", metavar="WORKSPACE", type=_json_file)
@click.option("--fit", "fit_path", type=_json_file, default=None, help="Post-fit: fit.json.")
@click.option(
    "--config",
    "config_path",
    type=_json_file,
    default=None,
    help="Analysis YAML: bin edges and observable names.",
)
@click.option("--log-y", is_flag=True, help="Logarithmic y axis.")
@_plot_options
def plot_distributions(
    workspace_path: pathlib.Path,
    fit_path: pathlib.Path | None,
    config_path: pathlib.Path | None,
    log_y: bool,
    stem: pathlib.Path,
) -> None:
    """Stacked pre-fit (or, with --fit, post-fit) distributions: STEM_<channel>.png/.pdf."""
    from analysis import plotting
    from analysis.fit import FitResult
    from analysis.prediction import prediction

    workspace = load_workspace(workspace_path)
    model = workspace.model()
    fit_result = None
    if fit_path is not None:
        fit_result = _read_json(fit_path, "fit", FIT_KEYS, FitResult.from_dict)
    regions = _regions(config_path)
    figures = plotting.distributions(
        prediction(model, fit_result),
        workspace.data(model, include_auxdata=False),
        edges={region.name: list(region.binning) for region in regions} or None,
        observable={region.name: region.variable for region in regions} or None,
        log_y=log_y,
        signal=workspace.signal_samples(),
    )
    for channel, figure in figures.items():
        _save(figure, stem.with_name(f"{stem.name}_{channel}"))


@plot.command("pulls")
@click.argument("fit_path", metavar="FIT", type=_json_file)
@click.option(
    "--workspace",
    "workspace_path",
    type=_json_file,
    required=True,
    help="The fitted workspace (pre-fit constraint widths).",
)
@_plot_options
def plot_pulls(fit_path: pathlib.Path, workspace_path: pathlib.Path, stem: pathlib.Path) -> None:
    """Nuisance-parameter pulls with post-fit uncertainties."""
    from analysis.fit import FitResult
    from analysis.plotting import pulls

    model = load_workspace(workspace_path).model()
    _save(
        _read_json(fit_path, "fit", FIT_KEYS, lambda p: pulls(FitResult.from_dict(p), model)), stem
    )


@plot.command("correlation")
@click.argument("fit_path", metavar="FIT", type=_json_file)
@click.option(
    "--pruning-threshold",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop parameters whose correlations are all below this.",
)
@_plot_options
def plot_correlation(fit_path: pathlib.Path, pruning_threshold: float, stem: pathlib.Path) -> None:
    """Correlation matrix of the fitted parameters."""
    from analysis.fit import FitResult
    from analysis.plotting import correlation_matrix

    def figure(payload: Any) -> Any:
        return correlation_matrix(FitResult.from_dict(payload), pruning_threshold=pruning_threshold)

    _save(_read_json(fit_path, "fit", FIT_KEYS, figure), stem)


@plot.command("ranking")
@click.argument("ranking_path", metavar="RANKING", type=_json_file)
@click.option(
    "--workspace",
    "workspace_path",
    type=_json_file,
    default=None,
    help="The workspace: pulls in units of the pre-fit widths.",
)
@click.option("--max-pars", type=click.IntRange(min=1), default=None)
@_plot_options
def plot_ranking(
    ranking_path: pathlib.Path,
    workspace_path: pathlib.Path | None,
    max_pars: int | None,
    stem: pathlib.Path,
) -> None:
    """Impact of the nuisance parameters on the POI, with their pulls."""
    from analysis.inference import RankingResult
    from analysis.plotting import ranking

    model = None if workspace_path is None else load_workspace(workspace_path).model()

    def figure(payload: Any) -> Any:
        return ranking(RankingResult.from_dict(payload), model, max_pars=max_pars)

    _save(_read_json(ranking_path, "ranking", ("ranking",), figure), stem)


@plot.command("templates")
@click.argument("histograms_path", metavar="HISTOGRAMS", type=_json_file)
@click.option(
    "--config",
    "config_path",
    type=_json_file,
    default=None,
    help="Analysis YAML: observable names.",
)
@_plot_options
def plot_templates(
    histograms_path: pathlib.Path, config_path: pathlib.Path | None, stem: pathlib.Path
) -> None:
    """Nominal against up/down templates of every systematic variation (the output of
    diffana histograms): STEM_<region>_<sample>_<systematic>.png/.pdf."""
    from analysis.errors import ConfigError
    from analysis.plotting import templates

    observable = {region.name: region.variable for region in _regions(config_path)} or None
    figures = _read_json(
        histograms_path,
        "histograms (region -> sample -> variation -> edges, yields, sumw2)",
        parse=lambda payload: templates(payload, observable=observable),
    )
    if not figures:
        raise ConfigError(f"{histograms_path}: no systematic variations (<name>_Up/_Down) in it")
    for (region, sample, syst), figure in figures.items():
        _save(figure, stem.with_name(f"{stem.name}_{region}_{sample}_{syst}"))


@plot.command("scan")
@click.argument("scan_path", metavar="SCAN", type=_json_file)
@_plot_options
def plot_scan(scan_path: pathlib.Path, stem: pathlib.Path) -> None:
    """Profile-likelihood scan of a parameter."""
    from analysis.inference import ScanResult
    from analysis.plotting import likelihood_scan

    keys = ("parameter", "bestfit", "uncertainty", "values", "delta_twice_nll")
    _save(
        _read_json(scan_path, "scan", keys, lambda p: likelihood_scan(ScanResult.from_dict(p))),
        stem,
    )


@plot.command("cls")
@click.argument("limit_path", metavar="LIMIT", type=_json_file)
@click.option("--log-y", is_flag=True, help="Logarithmic CLs axis.")
@_plot_options
def plot_cls(limit_path: pathlib.Path, log_y: bool, stem: pathlib.Path) -> None:
    """CLs against the POI with the expected bands and the limits (the Brazil plot)."""
    from analysis.inference import HypotestResult, LimitResult
    from analysis.plotting import cls_brazil

    def figure(payload: Any) -> Any:
        curve = HypotestResult.from_scan(payload["scan"])
        return cls_brazil(curve, LimitResult.from_dict(payload), log_y=log_y)

    _save(_read_json(limit_path, "limit", ("cl", "observed", "expected", "scan"), figure), stem)


@plot.command("optimization")
@click.argument("result_path", metavar="RESULT", type=_json_file)
@_plot_options
def plot_optimization(result_path: pathlib.Path, stem: pathlib.Path) -> None:
    """History of an optimization (result.json): metrics, cut values, schedule."""
    from analysis.plotting import optimization_history

    keys = ("objective", "history")
    _save(_read_json(result_path, "optimization result", keys, optimization_history), stem)


@plot.command("soft-vs-hard")
@config_options
@click.option(
    "--result",
    "result_path",
    type=_json_file,
    default=None,
    help="result.json of the optimization: its last temperature and bandwidth.",
)
@device_option
@threads_option
@_plot_options
def plot_soft_vs_hard(
    config: Any,
    cache_dir: pathlib.Path | None,
    result_path: pathlib.Path | None,
    device: str,
    threads: int,
    stem: pathlib.Path,
) -> None:
    """Soft-cut KDE histograms against hard ones at the same cuts: STEM_<region>.png/.pdf.

    The temperature and bandwidth are the last step's of --result, else the configured end
    of the schedule.
    """
    from analysis.optimize import schedule
    from analysis.pipeline import AnalysisPipeline
    from analysis.plotting import soft_vs_hard

    settings = config.optimization
    if result_path is not None:
        tau, bandwidth = _read_json(
            result_path,
            "optimization result",
            ("history",),
            lambda p: (float(p["history"][-1]["tau"]), float(p["history"][-1]["bandwidth"])),
        )
    else:
        tau, bandwidth = schedule(
            settings.steps - 1, settings.steps, settings.temperature, settings.bandwidth
        )
    set_threads(threads)
    pipeline = AnalysisPipeline.from_config(
        config, device=resolve_device(device), cache_dir=cache_dir
    )
    with torch.no_grad():
        soft, hard = pipeline.histograms(tau, bandwidth), pipeline.histograms(0.0, 0.0)
    for region in config.regions:
        keys = [(region.name, sample.name, "nominal") for sample in config.samples_in(region)]
        figure = soft_vs_hard(
            {key[1]: soft[key] for key in keys},
            {key[1]: hard[key] for key in keys},
            observable=region.variable,
            text=f"{region.name}: tau = {tau:.3g}, bandwidth = {bandwidth:.3g} bins",
        )
        _save(figure, stem.with_name(f"{stem.name}_{region.name}"))


@plot.command("cutflow")
@click.argument("cutflow_path", metavar="CUTFLOW", type=_json_file)
@click.option("--events", "weighted", flag_value=False, help="Unweighted MC event counts.")
@click.option("--yields", "weighted", flag_value=True, default=True, help="Weighted yields.")
@_plot_options
def plot_cutflow(cutflow_path: pathlib.Path, weighted: bool, stem: pathlib.Path) -> None:
    """Cut flow per region, starting and (if present) optimized cuts: STEM_<region>.png/.pdf."""
    from analysis.cutflow import CutFlow
    from analysis.plotting.cutflow import cutflow_chart

    def figures(payload: Any) -> dict[str, Any]:
        out = {}
        for region, flow in payload["start"].items():
            optimized = payload.get("optimized", {}).get(region)
            out[region] = cutflow_chart(
                CutFlow.from_dict(flow),
                None if optimized is None else CutFlow.from_dict(optimized),
                weighted=weighted,
            )
        return out

    for region, figure in _read_json(cutflow_path, "cut flow", ("start",), figures).items():
        _save(figure, stem.with_name(f"{stem.name}_{region}"))


@main.command()
@click.argument(
    "results", metavar="RESULTS", type=click.Path(file_okay=False, path_type=pathlib.Path)
)
@click.option("--config", "config_path", type=_json_file, required=True, help="Analysis YAML.")
@click.option("--output", "-o", type=_json_file, required=True, help="The HTML file to write.")
@click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
def report(
    results: pathlib.Path, config_path: pathlib.Path, output: pathlib.Path, verbose: int
) -> None:
    """One self-contained HTML report of a workflow run from its RESULTS folder
    (results/<analysis>): summary, results before and after optimization, every plot and
    table, software versions and the configuration."""
    from analysis.errors import InputFileError
    from analysis.report import analysis_report

    _setup_logging(verbose)
    if not results.is_dir():
        raise InputFileError(f"{results}: results folder not found")
    write_atomically(output, analysis_report(results, config_path))
    click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
