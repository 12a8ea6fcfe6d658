"""The statistics commands: ``fit``, ``hypotest``, ``significance``, ``limit``, ``scan`` and
``ranking`` (pyhf's ``cli/infer.py``).

They share INPUT handling (:func:`input_options`) and check what a user can get wrong before
any fit runs: parameter names in --fix, --minos and --parameter, a POI where the command needs
one, a POI value within its bounds, a finite likelihood at the start point
(:func:`analysis.inference.check_start`). A singular or indefinite Hessian is not a refusal:
significance, CLs, limits and scans need profiled likelihood values only, and fit reports the
uncertainties it cannot compute as null. They run under torch.no_grad(): the CLI wants
numbers, not graphs (the fits switch autograd on where they need derivatives).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import click

from analysis.cli._common import (
    SEED,
    DeviceRequest,
    _LazyModule,
    common_options,
    emit,
    load_workspace,
    log,
)
from analysis.errors import AnalysisError

if TYPE_CHECKING:
    import torch
else:
    torch = _LazyModule("torch")


def input_options(
    *, needs_poi: bool, numpy_command: Callable[..., dict] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``INPUT`` (pyhf JSON workspace, HistFactory XML or analysis YAML) and its options.

    Passes ``workspace`` and ``model`` on, and runs the command without autograd graphs. Goes
    below :func:`common_options` (which sets up logging first; this resolves ``--device``).
    ``needs_poi``: the command needs the measurement's POI; the others (fit, scan) also run on
    a measurement without one. Errors from the command that do not name the input get its name
    in front.

    ``numpy_command``: the command on the numpy backend (:mod:`analysis.numpy_backend`), for
    a JSON workspace on the CPU: ``numpy_command(workspace, model, **options)`` returns the
    output, or raises :class:`~analysis.numpy_backend.Unsupported` and the command runs on
    torch (:func:`_numpy_output`). The command then has ``--backend``.
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
            device: DeviceRequest,
            **kwargs: Any,
        ) -> Any:
            backend = kwargs.pop("backend", "torch")
            if numpy_command is not None and backend != "torch" and device.name in ("auto", "cpu"):
                if input_path.suffix.lower() == ".json" and cuts is None:
                    output = _numpy_output(
                        numpy_command, input_path, patches, measurement, backend, kwargs
                    )
                    if output is not None:
                        return emit(output, kwargs["output"])
            from analysis.cache import default_cache_dir  # not analysis.io: awkward, uproot

            on = device.resolve()
            cache = None if no_cache else (cache_dir or default_cache_dir())
            workspace = load_workspace(input_path, patches, cuts=cuts, cache_dir=cache, device=on)
            model = _model(workspace, measurement, on, needs_poi)
            try:
                with torch.no_grad():
                    return func(*args, workspace=workspace, model=model, device=on, **kwargs)
            except AnalysisError as err:
                if workspace.source in str(err):
                    raise
                message = f"{workspace.source}: {err}"
                try:
                    named = type(err)(message)
                except TypeError:  # a subclass with another signature: keep the message
                    named = AnalysisError(message)
                raise named from None

        wrapper.defers_device = True  # type: ignore[attr-defined]
        if numpy_command is not None:
            return backend_option(wrapper)
        return wrapper

    return decorate


backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "numpy", "torch"]),
    default="auto",
    show_default=True,
    help="auto: a JSON workspace of at most 40 parameters on the CPU runs on numpy (no torch "
    "start-up), anything else on torch; numpy: numpy for a JSON workspace of any size; torch: "
    "always torch. Results agree to the fits' tolerance.",
)


def _numpy_output(
    command: Callable[..., dict],
    input_path: pathlib.Path,
    patches: tuple[str, ...],
    measurement: str | None,
    backend: str,
    options: dict[str, Any],
) -> dict | None:
    """The output of ``command`` on the numpy backend, or None where the torch engine must
    run it: a model above :data:`~analysis.numpy_backend.AUTO_MAX_PARAMETERS` parameters
    (``--backend auto``), or a case the backend does not take (``Unsupported``; the torch
    engine then reports any problem as it always does). Errors in the workspace itself are
    reported here, as the torch path would (they do not depend on the engine)."""
    from analysis.likelihood.workspace import Workspace
    from analysis.numpy_backend import AUTO_MAX_PARAMETERS, Unsupported
    from analysis.numpy_backend.model import NumpyModel

    workspace = Workspace.load(input_path, patches)
    meas = workspace.measurement(measurement)
    try:
        model = NumpyModel(
            workspace.model_spec(meas["name"]),
            poi_name=meas["config"].get("poi") or None,
            source=workspace.source,
        )
        if backend == "auto" and model.npars > AUTO_MAX_PARAMETERS:
            log.info("%d parameters > %d: running on torch", model.npars, AUTO_MAX_PARAMETERS)
            return None
        log.info("numpy backend: %d parameters", model.npars)
        options = {k: v for k, v in options.items() if k not in ("output",)}
        return command(workspace, model, **options)
    except Unsupported as reason:
        log.info("numpy backend: %s; running on torch", reason)
        return None


def _numpy_data(workspace: Any, model: Any, asimov: bool) -> Any:
    """The observed data (main bins in the model's channel order, then the auxiliary data),
    or the Asimov data at the suggested initial parameters, as numpy arrays."""
    import numpy as np

    from analysis.numpy_backend import Unsupported

    if asimov:
        return model.expected_data(model.suggested_init())
    observed = {o["name"]: o["data"] for o in workspace.spec["observations"]}
    parts = []
    for channel in model.channels:
        values = np.asarray(observed.get(channel, ()), dtype=float)
        if values.shape != (model.channel_nbins[channel],) or not (values >= 0).all():
            raise Unsupported(f"observation of channel '{channel}'")  # the torch engine says why
        parts.append(values)
    return np.concatenate([*parts, model.auxdata])


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


def _fixed_settings(model: Any, fix: tuple[str, ...]) -> tuple[Any, Any, dict[str, float]]:
    """Initial values and fixed mask with ``--fix NAME=VALUE`` applied (a name or a set name),
    and the fixed values by name."""
    import math

    from analysis.errors import ConfigError

    init, fixed = _copy(model.suggested_init()), _copy(model.suggested_fixed())
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


def _copy(values: Any) -> Any:
    """A copy of a tensor (torch engine) or an array (numpy backend)."""
    return values.clone() if hasattr(values, "clone") else values.copy()


# ---------------------------------------------------------------------- the numpy backend
def _numpy_fit(workspace, model, *, asimov, minos, fix, method) -> dict:
    from analysis.numpy_backend import Unsupported, infer

    if minos or method != "newton":
        raise Unsupported("MINOS or --method minuit")
    data = _numpy_data(workspace, model, asimov)
    try:
        init, fixed, _ = _fixed_settings(model, fix)
    except AnalysisError as err:  # reported by the torch engine's checks
        raise Unsupported(str(err)) from None
    return infer.global_fit(model, data, init, fixed)


def _poi_value_checked(model, poi_value: float, test_stat: str) -> None:
    from analysis.numpy_backend import Unsupported

    if model.poi_index is None:
        raise Unsupported("no POI")
    low, high = model.suggested_bounds()[model.poi_index]
    if not low <= poi_value <= high or (test_stat == "q0" and poi_value != 0):
        raise Unsupported("--poi-value")  # the torch engine says why


def _numpy_hypotest(workspace, model, *, poi_value, test_stat, asimov, calctype, **_) -> dict:
    from analysis.numpy_backend import Unsupported, infer

    if calctype != "asymptotics":
        raise Unsupported("toys")
    _poi_value_checked(model, poi_value, test_stat)
    data = _numpy_data(workspace, model, asimov)
    return infer.hypotest(model, data, poi_value, test_stat)


def _numpy_significance(workspace, model, *, asimov) -> dict:
    from analysis.numpy_backend import infer

    return infer.significance(model, _numpy_data(workspace, model, asimov))


def _numpy_limit(workspace, model, *, cl, asimov) -> dict:
    from analysis.numpy_backend import infer

    return infer.upper_limit_with_curve(model, _numpy_data(workspace, model, asimov), cl)


@click.command()
@common_options
@input_options(needs_poi=False, numpy_command=_numpy_fit)
@click.option("--asimov", is_flag=True, help="Fit the Asimov dataset (pre-fit expectation).")
@click.option("--minos", multiple=True, help="Run MINOS for this parameter; repeatable.")
@click.option(
    "--fix",
    multiple=True,
    help="Fix a parameter (or every parameter of a set, e.g. a staterror): NAME=VALUE; repeatable.",
)
@click.option(
    "--method",
    type=click.Choice(["newton", "minuit"]),
    default="newton",
    show_default=True,
    help="newton: exact minimum and Hessian errors; minuit: MIGRAD + HESSE (cabinetry's numbers).",
)
def fit(
    workspace: Any,
    model: Any,
    asimov: bool,
    minos: tuple[str, ...],
    fix: tuple[str, ...],
    method: Literal["newton", "minuit"],
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Maximum-likelihood fit with uncertainties, optional MINOS.

    ``--method newton`` (default): the exact minimum by batched Newton steps and the errors of
    the exact Hessian; a parameter held on a bound is flagged in ``at_bound`` and has no
    parabolic error, except the POI, whose error is then one-sided from the profile likelihood.
    ``--method minuit``: MIGRAD + HESSE with cabinetry's settings (HESSE's errors go through
    Minuit's limit transformation), checked against the Newton minimum.
    """
    from analysis import inference
    from analysis.errors import ConfigError

    data = _data(workspace, model, asimov)
    init, fixed, fixed_values = _fixed_settings(model, fix)
    for name in minos:
        if bool(fixed[_parameter_index(model, "--minos", name)]):
            raise ConfigError(
                f"--minos {name}: the parameter is fixed (by --fix or the measurement)"
            )
    inference.check_start(workspace, model, data, init, asimov=asimov, fixed_values=fixed_values)
    result = inference.global_fit(model, data, init, fixed, minos, method=method)
    emit(result.to_dict(), output)


@click.command()
@common_options
@input_options(needs_poi=True, numpy_command=_numpy_hypotest)
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
@click.option("--seed", type=SEED, default=0, show_default=True, help="Toy seed (toybased).")
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
    inference.check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    if calctype == "toybased":
        result = inference.toy_hypotest(
            model, data, poi_value, test_stat, n_toys=n_toys, seed=seed, progress=True
        )
        toys = {"calctype": calctype, "n_toys": n_toys, "seed": seed}
    else:
        result, toys = inference.hypotest(model, data, poi_value, test_stat), {}
    emit({**result.to_dict(), **toys}, output)


@click.command()
@common_options
@input_options(needs_poi=True, numpy_command=_numpy_significance)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
def significance(
    workspace: Any, model: Any, asimov: bool, output: pathlib.Path | None, device: torch.device
) -> None:
    """Discovery p-value and significance (observed and expected)."""
    from analysis import inference

    data = _data(workspace, model, asimov)
    inference.check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    result = inference.significance(model, data)
    emit(result.to_dict(), output)


@click.command()
@common_options
@input_options(needs_poi=True, numpy_command=_numpy_limit)
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
    inference.check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    # with CLs on a POI grid through every limit (pyhf's upper_limit return_results): the
    # Brazil plot, from the limits' own calculator (its free and Asimov fits are reused)
    result, curve = inference.upper_limit_with_curve(model, data, cl)
    emit(
        {
            **result.to_dict(),
            "scan": {
                "poi_values": curve.poi_value.tolist(),
                "cls_obs": curve.cls_obs.tolist(),
                "cls_exp": curve.cls_exp.tolist(),
            },
        },
        output,
    )


@click.command()
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
    inference.check_start(workspace, model, data, init, asimov=asimov)
    values = None
    if scan_range is not None:
        values = torch.linspace(*scan_range, steps, dtype=model.dtype, device=model.device)
        starts = init.expand(steps, -1).clone()
        starts[:, index] = values
        bad = ~torch.isfinite(model.twice_nll(starts, data))
        if bool(bad.any()):
            inference.check_start(
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


@click.command()
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
    inference.check_start(workspace, model, data, model.suggested_init(), asimov=asimov)
    best = inference.global_fit(model, data, model.suggested_init(), model.suggested_fixed(), ())
    result = inference.ranking(model, data, best)
    emit({"poi": model.poi_name, **result.to_dict()}, output)
