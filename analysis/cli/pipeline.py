"""The analysis commands, from events to optimized cuts and the report: ``generate``,
``validate``, ``histograms``, ``workspace``, ``cutflow``, ``optimize``, ``scan-cuts`` and
``report``."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import click

from analysis.cli._common import (
    SEED,
    DaskRequest,
    _json_file,
    _setup_logging,
    common_options,
    config_options,
    dask_options,
    emit,
)
from analysis.files import check_writable, write_atomically

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@click.command()
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
@click.option("--seed", type=SEED, default=1, show_default=True, help="Random seed.")
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


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--data",
    is_flag=True,
    help="Also open the input files: check every tree and branch, and evaluate every "
    "expression on the first --entries entries of each file (no histogram is filled); "
    "every problem is printed, one line each.",
)
@click.option(
    "--entries",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    metavar="N",
    help="With --data: entries per file the expressions are evaluated on.",
)
@common_options
def validate(
    config_path: pathlib.Path, data: bool, entries: int, output: pathlib.Path | None
) -> None:
    """Validate an analysis configuration (schema, names, expressions, Definition cycles;
    no file is opened); with --data also its input files.

    Example: diffana validate models/dimuon.yaml --data
    """
    from analysis import config as configuration

    config = configuration.load(config_path)
    if not data:
        emit({"valid": True}, output)
        return
    if config.general.input_type == "histogram":
        from analysis.histogram_inputs import read_histograms

        emit({"valid": True, "histograms": len(read_histograms(config))}, output)
        return
    from analysis.io import check_inputs

    result = check_inputs(config, entries=entries)
    if result.problems:
        for problem in result.problems:
            click.echo(f"Error: {problem}", err=True)
        click.get_current_context().exit(2)
    emit(result.to_dict(), output)


def _hard_histograms(
    config: Any, cache_dir: pathlib.Path | None, device: torch.device, dask: DaskRequest | None
) -> Any:
    """The hard histograms of ``config``: in this process, or with ``--dask`` on Dask
    (:mod:`analysis.dask_histograms`)."""
    if dask is None:
        from analysis.histograms import hard_histograms

        return hard_histograms(config, device=device, cache_dir=cache_dir)
    from analysis.dask_histograms import dask_client, hard_histograms_dask

    with dask_client(dask.address, timeout=dask.timeout) as client:
        return hard_histograms_dask(
            config,
            client,
            partition_size=dask.partition_size,
            cache_dir=cache_dir,
            device=device,
        )


@click.command()
@config_options
@common_options
@dask_options
def histograms(
    config: Any,
    cache_dir: pathlib.Path | None,
    output: pathlib.Path | None,
    device: torch.device,
    dask: DaskRequest | None,
) -> None:
    """Hard histograms (edges, yields, sumw2) per region, sample and variation."""
    from analysis.histograms import histograms_to_dict

    emit(histograms_to_dict(_hard_histograms(config, cache_dir, device, dask)), output)


@click.command()
@config_options
@common_options
@dask_options
def workspace(
    config: Any,
    cache_dir: pathlib.Path | None,
    output: pathlib.Path | None,
    device: torch.device,
    dask: DaskRequest | None,
) -> None:
    """Build the pyhf JSON workspace of an analysis (hard cuts)."""
    from analysis import workspace as ws

    emit(ws.build(config, _hard_histograms(config, cache_dir, device, dask)), output)


def _out_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--out DIR``: the run's folder (optimize, scan-cuts). Not ``-o/--output FILE``, which
    every command has for its JSON (DESIGN.md, CLI contract)."""
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=pathlib.Path),
        required=True,
        metavar="DIR",
        help="Folder the run writes into: DIR/result.json, DIR/cuts.json (the best cuts, for "
        "--cuts of other commands) and DIR/checkpoint.pt. -o/--output FILE is another thing: "
        "where the JSON summary (the content of result.json) is printed, stdout by default.",
    )(func)


def _objective_names() -> tuple[str, ...]:
    """The objectives' registry names (:data:`analysis.objectives.OBJECTIVES`), as the config
    schema's ``Optimization.Objective`` enum lists them (tests keep the two equal): read from
    the schema so that ``--help`` imports no torch."""
    import json
    from importlib import resources

    schema = json.loads(resources.files("analysis").joinpath("schemas/config.json").read_text())
    return tuple(schema["definitions"]["optimization"]["properties"]["Objective"]["enum"])


def _objective_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--objective",
        type=click.Choice(_objective_names()),
        default=None,
        help="Figure of merit (default: the config's Optimization.Objective).",
    )(func)


def check_run_outputs(out_dir: pathlib.Path, output: pathlib.Path | None) -> None:
    """Refuse (OutputError, exit 2) an ``--output FILE`` that is ``--out DIR`` itself or a file
    the run writes in it (result.json, cuts.json, checkpoint.pt): the JSON summary would
    replace the best cuts or the checkpoint."""
    from analysis.errors import OutputError
    from analysis.optimize import CHECKPOINT, CUTS, RESULT

    if output is None:
        return
    target, folder = output.resolve(), out_dir.resolve()
    if target == folder:
        raise OutputError(
            f"--output {output}: is the --out folder; --output takes a FILE for the JSON "
            f"summary (e.g. {out_dir / 'summary.json'}), --out the folder of the run"
        )
    if target.parent == folder and target.name in (RESULT, CUTS, CHECKPOINT):
        raise OutputError(
            f"--output {output}: the run writes {target.name} in --out {out_dir} itself; "
            "give --output another file name, or leave it out (DIR/result.json holds the same "
            "JSON)"
        )


@click.command()
@config_options
@common_options
@dask_options
def cutflow(
    config: Any,
    start_config: Any,
    cache_dir: pathlib.Path | None,
    output: pathlib.Path | None,
    device: torch.device,
    dask: DaskRequest | None,
) -> None:
    """Hard cut flow per region and sample: events, yields and their uncertainty after each cut.

    Output: ``start`` (region -> cut flow at the configured cuts) and, with ``--cuts``,
    ``optimized`` (the same at those cuts) and ``cuts`` (starting against optimized values);
    ``mc_statistics``: per cut set (``start``[, ``optimized``]) the effective number of
    background MC events per bin at the last step, and the bins below the guard
    (Optimization.MinEffectiveEvents), which a warning names.
    """
    from analysis import cutflow as flows
    from analysis.histogram_inputs import require_events
    from analysis.io import read_events
    from analysis.mc_statistics import guard_warning

    require_events(start_config, "a cut flow")

    cut_sets = {"start": start_config}
    if config is not start_config:
        cut_sets["optimized"] = config
    if dask is None:
        templates = [t for t in start_config.templates() if t.variation == "nominal"]
        events = read_events(start_config, templates, device=device, cache_dir=cache_dir)
        computed = [
            (flows.cut_flow(cfg, events), flows.mc_statistics_summary(cfg, events))
            for cfg in cut_sets.values()
        ]
    else:
        from analysis.dask_histograms import cut_flows_dask, dask_client

        with dask_client(dask.address, timeout=dask.timeout) as client:
            computed = cut_flows_dask(
                list(cut_sets.values()),
                client,
                partition_size=dask.partition_size,
                cache_dir=cache_dir,
            )
    result: dict[str, Any] = {
        name: {r: f.to_dict() for r, f in flow.items()}
        for name, (flow, _) in zip(cut_sets, computed, strict=True)
    }
    if config is not start_config:
        result["cuts"] = flows.cut_comparison(start_config, config.cut_values())
    result["mc_statistics"] = {
        name: summary for name, (_, summary) in zip(cut_sets, computed, strict=True)
    }
    for name, summary in result["mc_statistics"].items():
        if summary["below_guard"]:
            log.warning(
                guard_warning(
                    summary["min_effective_events"], f"{name} cuts", summary["below_guard"]
                )
            )
    emit(result, output)


def _report_outputs(out_dir: pathlib.Path) -> None:
    from analysis.optimize import CUTS, RESULT

    click.echo(f"wrote {out_dir / RESULT} and {out_dir / CUTS}", err=True)


@click.command()
@config_options
@common_options
@_out_option
@_objective_option
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Number of Adam steps.")
@click.option("--seed", type=SEED, default=None, help="Random seed (default: the config's).")
@click.option("--resume", is_flag=True, help="Continue from DIR/checkpoint.pt.")
@click.option(
    "--distributed",
    is_flag=True,
    help="One rank of a torchrun launch: read a share of the events, all-reduce histograms "
    "and gradients (README, Scale-out: torch.distributed).",
)
@click.option(
    "--dist-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="With --distributed: how long a rank waits for the others before failing.",
)
def optimize(
    config: Any,
    cache_dir: pathlib.Path | None,
    out_dir: pathlib.Path,
    objective: str | None,
    steps: int | None,
    seed: int | None,
    resume: bool,
    distributed: bool,
    dist_timeout: float,
    output: pathlib.Path | None,
    device: torch.device,
) -> None:
    """Optimize the trainable cuts by gradient descent (writes DIR/result.json, DIR/cuts.json).

    --out DIR is the run's folder; -o/--output FILE, as in every command, receives the JSON
    summary (the content of result.json; stdout by default) and may not be DIR or a file in it
    that the run writes.

    Fails at once (exit 2) when DIR or --output cannot be written or another run is using DIR.
    DIR/result.json is written last: while it is absent the run has not finished. A warning
    names the bins whose background MC is below the guard (Optimization.MinEffectiveEvents)
    at the initial or the best cuts (:func:`analysis.optimize.optimize`).

    Example: diffana optimize models/dimuon.yaml --out results/opt --steps 50 -o summary.json

    --distributed: launched as torchrun --nproc-per-node N $(command -v diffana) optimize ...
    --distributed; every rank reads its share of the events; rank 0 writes DIR and the summary
    (:mod:`analysis.distributed`).
    """
    from analysis import optimize as optimization
    from analysis.histogram_inputs import require_events

    require_events(config, "cut optimization")
    check_run_outputs(out_dir, output)
    run = functools.partial(
        optimization.optimize,
        out_dir=out_dir,
        objective=objective,
        steps=steps,
        seed=seed,
        resume=resume,
        device=device,
        cache_dir=cache_dir,
    )
    writer = True  # the process that writes DIR and the summary
    if distributed:
        from analysis.distributed import optimize_distributed

        run = functools.partial(optimize_distributed, **run.keywords, timeout=dist_timeout)
        writer = os.environ.get("RANK", "0") == "0"
    if output is not None and writer:
        check_writable(output)
    result = run(config)
    if writer:
        _report_outputs(out_dir)
        emit(result.to_dict(), output)


@click.command("scan-cuts")
@config_options
@common_options
@_out_option
@click.option("--method", type=click.Choice(["grid", "random"]), required=True)
@click.option("--budget", type=click.IntRange(min=1), required=True, help="Hard evaluations.")
@_objective_option
@click.option("--seed", type=SEED, default=None, help="Random seed (default: the config's).")
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

    --out DIR is the run's folder; -o/--output FILE, as in every command, receives the JSON
    summary (the content of result.json; stdout by default) and may not be DIR or a file in it
    that the run writes.

    Fails at once (exit 2) when DIR or --output cannot be written or another run is using DIR.
    DIR/result.json is written last: while it is absent the run has not finished. A warning
    names the bins whose background MC is below the guard (Optimization.MinEffectiveEvents)
    at the initial or the best cuts (:func:`analysis.optimize.optimize`).

    Example: diffana scan-cuts models/dimuon.yaml --method random --budget 200 --out results/rnd
    """
    from analysis import optimize as optimization
    from analysis.histogram_inputs import require_events

    require_events(config, "a cut scan")
    check_run_outputs(out_dir, output)
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


@click.command()
@click.argument(
    "results", metavar="RESULTS", type=click.Path(file_okay=False, path_type=pathlib.Path)
)
@click.option("--config", "config_path", type=_json_file, required=True, help="Analysis YAML.")
@click.option("--output", "-o", type=_json_file, required=True, help="The HTML file to write.")
@click.option(
    "--unblind",
    is_flag=True,
    help="Show the Signal regions' data and observed results (default: blinded, expected "
    "results only; the results must also have been made unblinded: workflow unblind: true).",
)
@click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
def report(
    results: pathlib.Path,
    config_path: pathlib.Path,
    output: pathlib.Path,
    unblind: bool,
    verbose: int,
) -> None:
    """One self-contained HTML report of a workflow run from its RESULTS folder
    (results/<analysis>): summary, results before and after optimization, every plot and
    table, software versions and the configuration. Blinded by default: the data of the
    Signal regions are hidden and only expected results are shown; a notice at the top says
    so and names what is missing from RESULTS. A folder with no result file of the workflow
    is an error (exit 2).

    Example: diffana report results/dimuon --config models/dimuon.yaml -o report.html
    """
    from analysis.errors import InputFileError
    from analysis.report import analysis_report

    _setup_logging(verbose)
    if not results.is_dir():
        raise InputFileError(f"{results}: results folder not found")
    write_atomically(output, analysis_report(results, config_path, unblind=unblind))
    click.echo(f"wrote {output}", err=True)
