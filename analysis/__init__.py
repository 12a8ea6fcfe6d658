"""diffana: a differentiable HEP statistical analysis on PyTorch (DESIGN.md).

The short names a notebook user types, imported on first use (``import analysis`` itself
loads nothing heavy; each name is the function or class of the stage module given). None
shares a name with a submodule (importing ``analysis.optimize`` binds ``analysis.optimize``
to the module, hence ``optimize_cuts``)::

    import analysis as da

    config = da.load_config("models/dimuon.yaml")        # analysis.config.load
    events = da.read_events(config)                       # analysis.io.read_events
    pipeline = da.AnalysisPipeline.from_config(config, events)
    z = da.significance(pipeline)                         # hard Z at the pipeline's cuts
    result = da.optimize_cuts(config, events=events, out_dir="results/tuning", steps=50)
    da.plotting.optimization_history(result)              # a matplotlib Figure

====================  ==========================================================
name                  what it is
====================  ==========================================================
``load_config``       :func:`analysis.config.load`: analysis YAML -> ``Config``
``load_cuts``         :func:`analysis.config.load_cuts`: a ``cuts.json`` applied
``generate_demo``     :func:`analysis.generate.generate`: the demo ROOT files
``read_events``       :func:`analysis.io.read_events`: columns per template
``hard_histograms``   :func:`analysis.histograms.hard_histograms`: boolean cuts
``build_workspace``   :func:`analysis.workspace.build`: pyhf JSON workspace
``Workspace``         :class:`analysis.likelihood.Workspace`: model and data
``AnalysisPipeline``  :class:`analysis.pipeline.AnalysisPipeline`: soft analysis
``get_objective``     :func:`analysis.objectives.get_objective`: by name
``significance``      :func:`analysis.optimize.hard_metric` with the configured
                      objective (default: the expected discovery significance)
``hard_metric``       :func:`analysis.optimize.hard_metric`
``optimize_cuts``     :func:`analysis.optimize.optimize`: Adam on the cuts
``scan_cuts``         :func:`analysis.optimize.scan_cuts`: grid/random baseline
``predict``           :func:`analysis.prediction.prediction`: pre-/post-fit yields
``cut_flow``          :func:`analysis.cutflow.cut_flow`: events after each cut
``plotting``          :mod:`analysis.plotting`: every figure
``keep_freed_memory`` :func:`analysis.cli._common.keep_freed_memory`: the CLI's
                      malloc policy (no page faults for a step's temporaries)
====================  ==========================================================
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": ("analysis.config", "load"),
    "load_cuts": ("analysis.config", "load_cuts"),
    "generate_demo": ("analysis.generate", "generate"),
    "read_events": ("analysis.io", "read_events"),
    "hard_histograms": ("analysis.histograms", "hard_histograms"),
    "build_workspace": ("analysis.workspace", "build"),
    "Workspace": ("analysis.likelihood", "Workspace"),
    "AnalysisPipeline": ("analysis.pipeline", "AnalysisPipeline"),
    "get_objective": ("analysis.objectives", "get_objective"),
    "hard_metric": ("analysis.optimize", "hard_metric"),
    "optimize_cuts": ("analysis.optimize", "optimize"),
    "scan_cuts": ("analysis.optimize", "scan_cuts"),
    "predict": ("analysis.prediction", "prediction"),
    "cut_flow": ("analysis.cutflow", "cut_flow"),
    "keep_freed_memory": ("analysis.cli._common", "keep_freed_memory"),
}

__all__ = [*_EXPORTS, "plotting", "significance"]


def significance(pipeline: Any, objective: str | None = None) -> float:
    """The hard objective at the pipeline's current cut values: boolean cuts, ordinary
    histograms, full fit (:func:`analysis.optimize.hard_metric`). ``objective`` defaults to
    the analysis' ``Optimization.Objective`` (``discovery_significance``: the expected Asimov
    discovery significance Z0 with the nuisance parameters profiled)."""
    from analysis.objectives import get_objective
    from analysis.optimize import hard_metric

    name = objective or pipeline.config.optimization.objective
    return hard_metric(pipeline, get_objective(name))


def __getattr__(name: str) -> Any:
    if name == "plotting":
        return importlib.import_module("analysis.plotting")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(__all__)
