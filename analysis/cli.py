"""The ``diffana`` command line (contract in DESIGN.md).

Every command takes ``--output FILE`` (JSON; stdout when absent), ``--device auto|cpu|cuda[:N]``
and ``-v/--verbose``. Exit codes: 0 success, 2 user error (one line on stderr naming the file,
field or branch; no traceback), 1 internal error. Outputs are written atomically.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import click
import torch

from analysis.errors import AnalysisError

log = logging.getLogger("analysis")


class _Group(click.Group):
    """Turns user-input errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AnalysisError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(2)


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


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (no partial files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def emit(result: Any, output: pathlib.Path | None) -> None:
    """Print ``result`` as JSON to stdout, or write it to ``output``."""
    text = json.dumps(result, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomically(output, text)
        log.info("wrote %s", output)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--output``, ``--device`` and ``-v``; passes ``output`` and ``device`` on."""

    @click.option(
        "--output",
        "-o",
        type=click.Path(dir_okay=False, path_type=pathlib.Path),
        default=None,
        help="JSON output file (default: stdout).",
    )
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
    @click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
    @functools.wraps(func)
    def wrapper(
        *args: Any, output: pathlib.Path | None, device: str, verbose: int, **kwargs: Any
    ) -> Any:
        _setup_logging(verbose)
        return func(*args, output=output, device=resolve_device(device), **kwargs)

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

        cfg = configuration.load(config_path)
        if cuts is not None:
            cfg = configuration.load_cuts(cuts, cfg)
        cache = None if no_cache else (cache_dir or default_cache_dir())
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
    device: torch.device,
) -> None:
    """Generate the demo dimuon-resonance ROOT files."""
    from analysis import generate as generator

    kwargs = {} if lumi is None else {"lumi": lumi}
    paths = generator.generate(out_dir, events=events, seed=seed, **kwargs)
    emit({"files": [str(p) for p in paths]}, output)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=pathlib.Path))
@common_options
def validate(config_path: pathlib.Path, output: pathlib.Path | None, device: torch.device) -> None:
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
def input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``INPUT`` (pyhf JSON workspace, HistFactory XML or analysis YAML) and its options."""

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
        help="Column cache for an analysis YAML INPUT.",
    )
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        input_path: pathlib.Path,
        patches: tuple[str, ...],
        measurement: str | None,
        cuts: pathlib.Path | None,
        cache_dir: pathlib.Path | None,
        device: torch.device,
        **kwargs: Any,
    ) -> Any:
        workspace = load_workspace(
            input_path, patches, cuts=cuts, cache_dir=cache_dir, device=device
        )
        model = workspace.model(measurement, device=device)
        return func(*args, workspace=workspace, model=model, device=device, **kwargs)

    return wrapper


def load_workspace(
    input_path: pathlib.Path,
    patches: tuple[str, ...] = (),
    *,
    cuts: pathlib.Path | None = None,
    cache_dir: pathlib.Path | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """A :class:`~analysis.likelihood.Workspace` from a JSON workspace, XML or analysis YAML.

    An analysis YAML is turned into its workspace with hard cuts (as ``diffana workspace``).
    """
    from analysis.likelihood import Workspace

    if input_path.suffix.lower() in (".yaml", ".yml"):
        from analysis import config as configuration
        from analysis import workspace as builder
        from analysis.histograms import hard_histograms
        from analysis.io import default_cache_dir

        cfg = configuration.load(input_path)
        if cuts is not None:
            cfg = configuration.load_cuts(cuts, cfg)
        histograms = hard_histograms(cfg, device=device, cache_dir=cache_dir or default_cache_dir())
        return Workspace.load(builder.build(cfg, histograms), patches)
    return Workspace.load(input_path, patches)


def _data(workspace: Any, model: Any, asimov: bool) -> torch.Tensor:
    """Observed data (+ auxdata), or the Asimov dataset at the suggested initial parameters."""
    if asimov:
        return model.expected_data(model.suggested_init())
    return workspace.data(model)


def _fixed_settings(model: Any, fix: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial values and fixed mask with ``--fix NAME=VALUE`` applied (a name or a set name)."""
    from analysis.errors import ConfigError

    init, fixed = model.suggested_init().clone(), model.suggested_fixed().clone()
    for item in fix:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or number is None:
            raise ConfigError(f"--fix {item!r}: expected NAME=VALUE, e.g. --fix mu=1")
        if name in model.par_names:
            index: Any = model.par_names.index(name)
        elif name in model.par_slices:
            index = model.par_slices[name]
        else:
            raise ConfigError(
                f"--fix {item!r}: unknown parameter '{name}'; parameters: "
                f"{', '.join(model.par_names)}"
            )
        init[index] = number
        fixed[index] = True
    return init, fixed


@main.command()
@input_options
@click.option("--asimov", is_flag=True, help="Fit the Asimov dataset (pre-fit expectation).")
@click.option("--minos", multiple=True, help="Run MINOS for this parameter; repeatable.")
@click.option("--fix", multiple=True, help="Fix a parameter: NAME=VALUE; repeatable.")
@common_options
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
    from analysis import fit as fitting

    data = _data(workspace, model, asimov)
    init, fixed = _fixed_settings(model, fix)
    result = fitting.fit(
        lambda p: model.twice_nll(p, data),
        init,
        bounds=model.suggested_bounds(),
        fixed=fixed,
        labels=model.par_names,
        minos=minos,
        method="minuit",
    )
    emit(result.to_dict(), output)


@main.command()
@input_options
@click.option("--poi-value", type=float, required=True, help="POI value to test.")
@click.option(
    "--test-stat",
    type=click.Choice(["q", "qtilde", "q0"]),
    default="qtilde",
    show_default=True,
    help="Test statistic.",
)
@click.option("--asimov", is_flag=True, help="Test on the Asimov dataset instead of the data.")
@common_options
def hypotest(
    workspace: Any,
    model: Any,
    poi_value: float,
    test_stat: str,
    asimov: bool,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Asymptotic CLs hypothesis test at one POI value."""
    from analysis import inference

    result = inference.hypotest(model, _data(workspace, model, asimov), poi_value, test_stat)
    emit(
        {
            "poi_value": poi_value,
            "test_stat": float(result.teststat),
            "cls_obs": float(result.cls_obs),
            "cls_exp": result.cls_exp.tolist(),
        },
        output,
    )


@main.command()
@input_options
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
@common_options
def significance(
    workspace: Any, model: Any, asimov: bool, output: pathlib.Path | None, device: torch.device
) -> None:
    """Discovery p-value and significance (observed and expected)."""
    from analysis import inference

    emit(inference.significance(model, _data(workspace, model, asimov)).to_dict(), output)


@main.command()
@input_options
@click.option(
    "--cl",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Confidence level.",
)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
@common_options
def limit(
    workspace: Any,
    model: Any,
    cl: float,
    asimov: bool,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Observed and expected CLs upper limits on the POI."""
    from analysis import inference

    emit(inference.upper_limit(model, _data(workspace, model, asimov), cl=cl).to_dict(), output)


@main.command()
@input_options
@click.option("--parameter", required=True, help="Parameter to scan (default range: +-2 sigma).")
@click.option("--range", "scan_range", type=(float, float), default=None, help="LOW HIGH.")
@click.option("--steps", type=click.IntRange(min=2), default=11, show_default=True)
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
@common_options
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
    """Profile-likelihood scan of one parameter."""
    from analysis import inference

    values = None if scan_range is None else torch.linspace(*scan_range, steps, dtype=model.dtype)
    result = inference.scan(
        model, _data(workspace, model, asimov), parameter, values, n_steps=steps
    )
    emit(result.to_dict(), output)


@main.command()
@input_options
@click.option("--asimov", is_flag=True, help="Use the Asimov dataset instead of the data.")
@common_options
def ranking(
    workspace: Any, model: Any, asimov: bool, output: pathlib.Path | None, device: torch.device
) -> None:
    """Pre- and post-fit impact of each nuisance parameter on the POI."""
    from analysis import fit as fitting
    from analysis import inference

    data = _data(workspace, model, asimov)
    best = fitting.fit(
        lambda p: model.twice_nll(p, data),
        model.suggested_init(),
        bounds=model.suggested_bounds(),
        fixed=model.suggested_fixed(),
        labels=model.par_names,
        method="minuit",
    )
    emit(inference.ranking(model, data, best).to_dict(), output)


if __name__ == "__main__":  # pragma: no cover
    main()
