"""The ``diffana plot`` group: figures from the result files of the other commands (fit,
ranking, scan, limit, histograms, optimize, cutflow) and from an analysis YAML; each
subcommand writes OUT.png and OUT.pdf."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from analysis.cli._common import (
    _json_file,
    _LazyModule,
    _setup_logging,
    config_options,
    device_option,
    load_workspace,
    resolve_device,
    set_cpu_policy,
    threads_option,
)
from analysis.errors import AnalysisError

if TYPE_CHECKING:
    import torch
else:
    torch = _LazyModule("torch")


@click.group()
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


FIT_KEYS = ("labels", "bestfit", "uncertainty", "corr_mat", "twice_nll")
"""What a ``diffana fit`` file must hold for the plots."""


def _config(config_path: pathlib.Path | None) -> Any:
    """The analysis YAML ``--config`` (``None`` without it): binning, axis titles and units of
    the regions, the experiment label (:mod:`analysis.plotting.labels`)."""
    if config_path is None:
        return None
    from analysis import config as configuration

    return configuration.load(config_path)


@plot.command("distributions")
@click.argument("workspace_path", metavar="WORKSPACE", type=_json_file)
@click.option("--fit", "fit_path", type=_json_file, default=None, help="Post-fit: fit.json.")
@click.option(
    "--config",
    "config_path",
    type=_json_file,
    default=None,
    help="Analysis YAML: bin edges, axis titles with units (the Definitions' Unit, Label or "
    "Description) and the experiment label (General: Experiment, Label, Luminosity, Energy).",
)
@click.option(
    "--blind",
    is_flag=True,
    help="Draw no data in the signal regions (Regions with Type: Signal, the default) of "
    "--config, marked 'data blinded'.",
)
@click.option("--log-y", is_flag=True, help="Logarithmic y axis.")
@_plot_options
def plot_distributions(
    workspace_path: pathlib.Path,
    fit_path: pathlib.Path | None,
    config_path: pathlib.Path | None,
    blind: bool,
    log_y: bool,
    stem: pathlib.Path,
) -> None:
    """Stacked pre-fit (or, with --fit, post-fit) distributions: STEM_<channel>.png/.pdf."""
    from analysis import plotting
    from analysis.blinding import signal_regions
    from analysis.fit import FitResult
    from analysis.prediction import prediction

    config = _config(config_path)
    if blind and config is None:
        from analysis.errors import ConfigError

        raise ConfigError("--blind needs --config: the analysis YAML names the signal regions")
    workspace = load_workspace(workspace_path)
    model = workspace.model()
    fit_result = None
    if fit_path is not None:
        fit_result = _read_json(fit_path, "fit", FIT_KEYS, FitResult.from_dict)
    figures = plotting.distributions(
        prediction(model, fit_result),
        workspace.data(model, include_auxdata=False),
        log_y=log_y,
        signal=workspace.signal_samples(),
        config=config,
        blinded=signal_regions(config) if blind else (),
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
    help="Analysis YAML: axis titles with units and the experiment label.",
)
@_plot_options
def plot_templates(
    histograms_path: pathlib.Path, config_path: pathlib.Path | None, stem: pathlib.Path
) -> None:
    """Nominal against up/down templates of every systematic variation (the output of
    diffana histograms): STEM_<region>_<sample>_<systematic>.png/.pdf."""
    from analysis.errors import ConfigError
    from analysis.plotting import templates

    config = _config(config_path)
    figures = _read_json(
        histograms_path,
        "histograms (region -> sample -> variation -> edges, yields, sumw2)",
        parse=lambda payload: templates(payload, config=config),
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


_LABEL_CONFIG = click.option(
    "--config",
    "config_path",
    type=_json_file,
    default=None,
    help="Analysis YAML: the experiment label (General: Experiment, Label, Luminosity, Energy).",
)


@plot.command("cls")
@click.argument("limit_path", metavar="LIMIT", type=_json_file)
@click.option("--log-y", is_flag=True, help="Logarithmic CLs axis.")
@click.option(
    "--blind",
    is_flag=True,
    help="Expected CLs and limit only (no observed curve or limit): for blinded results.",
)
@_LABEL_CONFIG
@_plot_options
def plot_cls(
    limit_path: pathlib.Path,
    log_y: bool,
    blind: bool,
    config_path: pathlib.Path | None,
    stem: pathlib.Path,
) -> None:
    """CLs against the POI with the expected bands and the limits (the Brazil plot)."""
    from analysis.inference import HypotestResult, LimitResult
    from analysis.plotting import cls_brazil
    from analysis.plotting.labels import ExperimentLabel

    experiment = ExperimentLabel.from_config(_config(config_path))

    def figure(payload: Any) -> Any:
        curve = HypotestResult.from_scan(payload["scan"])
        limit = LimitResult.from_dict(payload)
        return cls_brazil(curve, limit, log_y=log_y, experiment=experiment, observed=not blind)

    _save(_read_json(limit_path, "limit", ("cl", "observed", "expected", "scan"), figure), stem)


@plot.command("optimization")
@click.argument("result_path", metavar="RESULT", type=_json_file)
@click.option(
    "--config",
    "config_path",
    type=_json_file,
    default=None,
    help="Analysis YAML: the units of the cut variables.",
)
@_plot_options
def plot_optimization(
    result_path: pathlib.Path, config_path: pathlib.Path | None, stem: pathlib.Path
) -> None:
    """History of an optimization (result.json): metrics, cut values, schedule."""
    from analysis.plotting import optimization_history

    config = _config(config_path)
    keys = ("objective", "history")
    _save(
        _read_json(
            result_path,
            "optimization result",
            keys,
            lambda payload: optimization_history(payload, config=config),
        ),
        stem,
    )


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
    from analysis.plotting.labels import ExperimentLabel, region_axes

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
            settings.steps - 1,
            settings.steps,
            settings.temperature,
            settings.bandwidth,
            settings.bandwidth_levels,
        )
    set_cpu_policy(threads)
    pipeline = AnalysisPipeline.from_config(
        config, device=resolve_device(device), cache_dir=cache_dir
    )
    with torch.no_grad():
        soft, hard = pipeline.histograms(tau, bandwidth), pipeline.histograms(0.0, 0.0)
    experiment = ExperimentLabel.from_config(config)
    for region in config.regions:
        keys = [(region.name, sample.name, "nominal") for sample in config.samples_in(region)]
        _, title, unit = region_axes(config, region.name)
        figure = soft_vs_hard(
            {key[1]: soft[key] for key in keys},
            {key[1]: hard[key] for key in keys},
            observable=title or region.variable,
            text=f"{region.name}\n$\\tau$ = {tau:.3g}\nbandwidth = {bandwidth:.3g} bins",
            unit=unit,
            experiment=experiment,
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
