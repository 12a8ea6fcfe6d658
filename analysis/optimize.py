"""Cut optimization by gradient descent, and the grid/random baselines (DESIGN.md, "optimize").

:func:`optimize` runs Adam on the pipeline's unconstrained cut parameters
(:attr:`analysis.pipeline.AnalysisPipeline.cut_parameters`) with the loss
``objective.loss(model, data)`` of the relaxed model at the step's temperature and bandwidth.

**Schedules.** With ``t = step / (steps - 1)`` (``t = 0`` for a single step), the relative cut
temperature goes from ``Temperature.initial`` (``T0``) to ``Temperature.final`` (``T1``)::

    exponential: tau(t) = T0 (T1 / T0)^t      linear: tau(t) = T0 + (T1 - T0) t
    constant:    tau(t) = T0

and the KDE bandwidth (units of the smallest bin width) is annealed by the same factor from
``Optimization.bandwidth``: ``bandwidth(t) = Optimization.bandwidth * tau(t) / T0`` (constant
when ``T0 = 0``). Both knobs thus reach their smallest values at the last step; the relaxed
objective tends to the hard one as they go to 0, at the price of noisier, steeper gradients.

**Honest evaluation.** The hard metric (boolean cuts, ordinary histograms, full fit: the
pipeline at ``tau = 0``, ``bandwidth = 0`` and the objective on that model) is evaluated at
step 0 and every ``evaluate_every`` steps at the point where that step's relaxed metric is
computed (before its update), and once more at the final parameters. The best point is kept by
the hard metric (larger is better for ``maximize`` objectives, smaller otherwise);
``cuts.json`` holds its cuts.

**Robustness.** A step whose loss or any gradient is not finite is rejected: no optimizer step
(parameters and Adam state unchanged), a warning naming the cause, and ``rejected`` in that
step's history entry. A point where an evaluation fails (:data:`NUMERICAL_ERRORS`: e.g. a
likelihood that is not finite at the fit's start because a cut removed a whole sample) gets
``null`` for that value and ``hard_error`` (or ``rejected``) with the cause; the run goes on.

**Checkpoints.** Every ``checkpoint_every`` steps ``out_dir/checkpoint.pt`` is written
atomically (pipeline state, Adam state, next step, history, best point, torch RNG state).
``resume=True`` restores all of it and continues; on the same machine the result is the same as
an uninterrupted run (float64, deterministic CPU kernels).

:func:`scan_cuts` is the baseline: the same trainable cuts, hard evaluations only, on a grid or
at uniform random points within each cut's Bounds, same output files.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from analysis.config import Config, Temperature
from analysis.errors import ConfigError, DataError, InputFileError
from analysis.files import json_text, write_atomically
from analysis.fit import FitError
from analysis.inference import InferenceError
from analysis.io import Events, TemplateKey
from analysis.objectives import Objective, get_objective
from analysis.pipeline import AnalysisPipeline
from analysis.progress import progress_bar

__all__ = [
    "OptimizationResult",
    "Point",
    "hard_metric",
    "optimize",
    "scan_cuts",
    "schedule",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CUTS = "cuts.json"


@dataclass(frozen=True)
class Point:
    """Cut values (all cuts, ``cuts.json`` format) with the relaxed and hard metric there
    (``None`` where not evaluated)."""

    cuts: Mapping[str, float]
    relaxed: float | None
    hard: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"cuts": dict(self.cuts), "relaxed": self.relaxed, "hard": self.hard}


@dataclass(frozen=True)
class OptimizationResult:
    """What ``result.json`` holds (DESIGN.md, CLI contract for ``optimize``/``scan-cuts``)."""

    objective: str
    initial: Point
    final: Point
    best: Point
    history: tuple[Mapping[str, Any], ...]
    hard_evaluations: int
    seconds: float
    device: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "initial": self.initial.to_dict(),
            "final": self.final.to_dict(),
            "best": self.best.to_dict(),
            "history": [dict(entry) for entry in self.history],
            "hard_evaluations": self.hard_evaluations,
            "seconds": self.seconds,
            "device": self.device,
            **self.extra,
        }


# ----------------------------------------------------------------------------- pure pieces
def schedule(
    step: int, steps: int, temperature: Temperature, bandwidth: float
) -> tuple[float, float]:
    """``(tau, bandwidth)`` at ``step`` of ``steps`` (module docstring, "Schedules")."""
    t = step / (steps - 1) if steps > 1 else 0.0
    t0, t1 = temperature.initial, temperature.final
    if temperature.schedule == "constant":
        tau = t0
    elif temperature.schedule == "linear":
        tau = t0 + (t1 - t0) * t
    elif temperature.schedule == "exponential":
        if t0 <= 0 or t1 <= 0:
            raise ConfigError(
                f"Optimization.Temperature: an exponential schedule needs Initial > 0 and "
                f"Final > 0, got {t0} and {t1}"
            )
        tau = t0 * (t1 / t0) ** t
    else:
        raise ConfigError(
            f"Optimization.Temperature.Schedule: unknown schedule {temperature.schedule!r}; "
            "expected exponential, linear or constant"
        )
    factor = tau / t0 if t0 > 0 else 1.0
    return float(tau), float(bandwidth * factor)


def _better(a: float, b: float | None, maximize: bool) -> bool:
    """Whether hard value ``a`` is better than ``b`` (``None``: nothing yet)."""
    if not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if maximize else a < b


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def hard_metric(pipeline: AnalysisPipeline, objective: Objective) -> float:
    """The objective with boolean cuts, ordinary histograms and a full fit at the pipeline's
    current thresholds (the pipeline at ``tau = 0``, ``bandwidth = 0``)."""
    with torch.no_grad():
        model, data = pipeline.model(0.0, 0.0)
        return float(objective(model, data))


NUMERICAL_ERRORS = (FitError, InferenceError, DataError)
"""Failures of one evaluation (a fit that cannot start, a sample with no yield left): that
point gets no value (``null``) and the cause in its history entry; the run goes on."""


def _evaluate_hard(pipeline: AnalysisPipeline, objective: Objective) -> tuple[float | None, str]:
    """:func:`hard_metric`, or ``(None, cause)`` when it is not finite or fails."""
    try:
        value = hard_metric(pipeline, objective)
    except NUMERICAL_ERRORS as err:
        log.warning("hard evaluation at %s failed: %s", pipeline.cut_values(), err)
        return None, str(err)
    if not math.isfinite(value):
        return None, f"hard {objective.name} is {value}"
    return value, ""


def _gradient_step(
    pipeline: AnalysisPipeline, optimizer: torch.optim.Optimizer, loss: torch.Tensor
) -> str | None:
    """Backpropagate ``loss`` and take one optimizer step, unless the loss or a gradient is not
    finite: then nothing changes and the cause is returned (``None`` when the step was taken)."""
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss.detach())):
        return f"loss is {float(loss.detach())}"
    loss.backward()
    grad = pipeline.cut_parameters.grad
    if grad is not None and not bool(torch.isfinite(grad).all()):
        bad = [
            f"{name} ({float(g)})"
            for name, g in zip(pipeline.trainable_cut_names, grad.tolist(), strict=True)
            if not math.isfinite(g)
        ]
        optimizer.zero_grad(set_to_none=True)
        return "gradient not finite for " + ", ".join(bad)
    optimizer.step()
    return None


# ----------------------------------------------------------------------------- files
def _write_json(path: pathlib.Path, payload: Any) -> None:
    write_atomically(path, json_text(payload))


def _write_outputs(out_dir: pathlib.Path, result: OptimizationResult) -> None:
    _write_json(out_dir / RESULT, result.to_dict())
    _write_json(out_dir / CUTS, dict(result.best.cuts))
    log.info("wrote %s and %s", out_dir / RESULT, out_dir / CUTS)


# ----------------------------------------------------------------------------- optimize
def optimize(
    config: Config,
    *,
    out_dir: str | os.PathLike[str],
    events: Mapping[TemplateKey, Events] | None = None,
    objective: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    callback: Callable[[Mapping[str, Any]], None] | None = None,
) -> OptimizationResult:
    """Optimize the trainable cuts of ``config`` (module docstring); write ``result.json`` and
    ``cuts.json`` to ``out_dir`` and return the result.

    ``objective``, ``steps`` and ``seed`` override ``config.optimization``. ``callback`` is
    called with each step's history entry (after that step's checkpoint, if any).
    Raises ConfigError for an unknown objective, no trainable cut, ``steps < 1`` or a checkpoint
    that does not belong to this run; InputFileError when ``resume`` finds no checkpoint.
    """
    settings = config.optimization
    objective_fn = get_objective(objective or settings.objective)
    steps = settings.steps if steps is None else steps
    seed = settings.seed if seed is None else seed
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    evaluate_every = max(1, int(settings.evaluate_every))
    checkpoint_every = max(1, int(settings.checkpoint_every))
    out = pathlib.Path(out_dir)
    start_time = time.perf_counter()
    pipeline = AnalysisPipeline.from_config(config, events, device=device, cache_dir=cache_dir)
    if not pipeline.trainable_cut_names:
        raise ConfigError(f"{config.source}: no trainable cut to optimize")
    optimizer = torch.optim.Adam([pipeline.cut_parameters], lr=settings.learning_rate)
    identity = {
        "objective": objective_fn.name,
        "steps": steps,
        "seed": seed,
        "cuts": list(pipeline.trainable_cut_names),
    }

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    initial: dict[str, Any] | None = None
    first = 0
    hard_evaluations = 0
    elapsed = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if resume:
            path = out / CHECKPOINT
            if not path.is_file():
                raise InputFileError(f"{path}: no checkpoint to resume from")
            state = torch.load(path, map_location=pipeline.cut_low.device, weights_only=True)
            if state["identity"] != identity:
                raise ConfigError(
                    f"{path}: checkpoint is for {state['identity']}, not for this run {identity}"
                )
            pipeline.load_state_dict(state["pipeline"])
            optimizer.load_state_dict(state["optimizer"])
            first, history, best, initial = (
                state["step"],
                state["history"],
                state["best"],
                state["initial"],
            )
            hard_evaluations, elapsed = state["hard_evaluations"], state["seconds"]
            torch.set_rng_state(state["rng"])
            log.info("resuming %s at step %d of %d", path, first, steps)

        bar = progress_bar(steps, objective_fn.name, enabled=progress, initial=first, unit="step")
        try:
            for step in range(first, steps):
                tau, bandwidth = schedule(step, steps, settings.temperature, settings.bandwidth)
                entry: dict[str, Any] = {
                    "step": step,
                    "tau": tau,
                    "bandwidth": bandwidth,
                    "cuts": pipeline.cut_values(),
                }
                try:
                    model, data = pipeline.model(tau, bandwidth)
                    loss = objective_fn.loss(model, data)
                except NUMERICAL_ERRORS as err:
                    loss = torch.tensor(math.nan)
                    failure = f"relaxed evaluation failed: {err}"
                else:
                    failure = None
                value = float(loss.detach())
                relaxed = -value if objective_fn.maximize else value
                entry["relaxed"] = _finite_or_none(relaxed)
                if step % evaluate_every == 0:
                    entry["hard"], error = _evaluate_hard(pipeline, objective_fn)
                    if error:
                        entry["hard_error"] = error
                    hard_evaluations += 1
                    if entry["hard"] is not None and _better(
                        entry["hard"],
                        None if best is None else best["hard"],
                        objective_fn.maximize,
                    ):
                        best = _point(entry)
                if initial is None:
                    initial = _point(entry)
                cause = failure or _gradient_step(pipeline, optimizer, loss)
                if cause is not None:
                    entry["rejected"] = cause
                    log.warning("step %d rejected: %s", step, cause)
                history.append(entry)
                bar.update(1)
                bar.set_postfix(
                    relaxed=f"{relaxed:.4g}",
                    hard=f"{best['hard']:.4g}" if best is not None else "-",
                )
                if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    _save_checkpoint(
                        out / CHECKPOINT,
                        identity=identity,
                        pipeline=pipeline,
                        optimizer=optimizer,
                        step=step + 1,
                        history=history,
                        best=best,
                        initial=initial,
                        hard_evaluations=hard_evaluations,
                        seconds=elapsed + time.perf_counter() - start_time,
                    )
                if callback is not None:
                    callback(entry)
        finally:
            bar.close()

        tau, bandwidth = schedule(steps - 1, steps, settings.temperature, settings.bandwidth)
        try:
            with torch.no_grad():
                model, data = pipeline.model(tau, bandwidth)
                relaxed = float(objective_fn(model, data))
        except NUMERICAL_ERRORS as err:
            log.warning("relaxed evaluation of the final point failed: %s", err)
            relaxed = math.nan
        final = {
            "cuts": pipeline.cut_values(),
            "relaxed": _finite_or_none(relaxed),
            "hard": _evaluate_hard(pipeline, objective_fn)[0],
        }
        hard_evaluations += 1
        if final["hard"] is not None and _better(
            final["hard"], None if best is None else best["hard"], objective_fn.maximize
        ):
            best = dict(final)
    if best is None:  # no finite hard value anywhere: report the initial point
        best = dict(initial)
    result = OptimizationResult(
        objective=objective_fn.name,
        initial=_as_point(initial),
        final=_as_point(final),
        best=_as_point(best),
        history=tuple(history),
        hard_evaluations=hard_evaluations,
        seconds=elapsed + time.perf_counter() - start_time,
        device=str(pipeline.cut_low.device),
    )
    _write_outputs(out, result)
    return result


def _point(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"cuts": dict(entry["cuts"]), "relaxed": entry.get("relaxed"), "hard": entry.get("hard")}


def _as_point(entry: Mapping[str, Any]) -> Point:
    return Point(cuts=dict(entry["cuts"]), relaxed=entry.get("relaxed"), hard=entry.get("hard"))


def _save_checkpoint(
    path: pathlib.Path,
    *,
    identity: Mapping[str, Any],
    pipeline: AnalysisPipeline,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, Any]],
    best: Mapping[str, Any] | None,
    initial: Mapping[str, Any] | None,
    hard_evaluations: int,
    seconds: float,
) -> None:
    state = {
        "identity": dict(identity),
        "pipeline": pipeline.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "history": history,
        "best": best,
        "initial": initial,
        "hard_evaluations": hard_evaluations,
        "seconds": seconds,
        "rng": torch.get_rng_state(),
    }
    write_atomically(path, lambda handle: torch.save(state, handle))
    log.debug("checkpoint %s at step %d", path, step)


# ----------------------------------------------------------------------------- baselines
def scan_points(
    bounds: list[tuple[float, float]],
    method: Literal["grid", "random"],
    budget: int,
    seed: int,
) -> np.ndarray:
    """Points ``(n, n_cuts)`` within ``bounds``.

    ``grid``: ``m_k`` values for cut ``k`` at the centres of ``m_k`` equal cells of
    ``[low, high]`` (``low + (i + 1/2)(high - low)/m_k``; a bound itself keeps all or no events
    and would be nudged by the pipeline), as even as the budget allows: every ``m_k`` starts at
    the largest ``m`` with ``m ** n_cuts <= budget``, then the cuts in order get one value more
    while ``prod_k m_k <= budget`` (budget 110 for 5 cuts: 3 x 3 x 3 x 2 x 2 = 108 points, where
    equal counts would give 2^5 = 32). ``random``: ``budget`` points uniform in the box, from
    ``numpy.random.default_rng(seed)``.
    """
    if budget < 1:
        raise ConfigError(f"budget must be >= 1, got {budget}")
    low = np.array([b[0] for b in bounds], dtype=float)
    high = np.array([b[1] for b in bounds], dtype=float)
    n = len(bounds)
    if method == "grid":
        m = max(1, int(math.floor(budget ** (1.0 / n) + 1e-9)))
        while (m + 1) ** n <= budget:
            m += 1
        while m**n > budget:
            m -= 1
        counts = [m] * n
        for k in range(n):
            if math.prod(counts) // counts[k] * (counts[k] + 1) > budget:
                break
            counts[k] += 1
        axes = [
            lo + (np.arange(c) + 0.5) * (hi - lo) / c
            for lo, hi, c in zip(low, high, counts, strict=True)
        ]
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([g.ravel() for g in mesh], axis=-1)
    if method == "random":
        rng = np.random.default_rng(seed)
        return low + (high - low) * rng.uniform(size=(budget, n))
    raise ConfigError(f"unknown scan method {method!r}; expected grid or random")


def scan_cuts(
    config: Config,
    *,
    method: Literal["grid", "random"],
    budget: int,
    out_dir: str | os.PathLike[str],
    seed: int | None = None,
    objective: str | None = None,
    events: Mapping[TemplateKey, Events] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> OptimizationResult:
    """Grid or random search over the trainable cuts, hard evaluations only (module docstring).

    The non-trainable cuts stay at their values. ``initial`` is the configured point (one hard
    evaluation more than ``budget``: ``hard_evaluations = budget_used + 1``), ``final`` the last
    scanned point, ``best`` the best by the hard metric; ``relaxed`` is ``null`` everywhere.
    History entries: ``step``, ``cuts``, ``hard``.
    """
    settings = config.optimization
    objective_fn = get_objective(objective or settings.objective)
    seed = settings.seed if seed is None else seed
    start_time = time.perf_counter()
    pipeline = AnalysisPipeline.from_config(config, events, device=device, cache_dir=cache_dir)
    names = pipeline.trainable_cut_names
    if not names:
        raise ConfigError(f"{config.source}: no trainable cut to scan")
    cuts = {cut.name: cut for cut in config.cuts}
    points = scan_points([cuts[name].bounds for name in names], method, budget, seed)

    def evaluate() -> dict[str, Any]:
        hard, error = _evaluate_hard(pipeline, objective_fn)
        out = {"cuts": pipeline.cut_values(), "relaxed": None, "hard": hard}
        return out | ({"hard_error": error} if error else {})

    initial = evaluate()
    best = dict(initial) if initial["hard"] is not None else None
    history = []
    bar = progress_bar(len(points), f"{method} {objective_fn.name}", enabled=progress, unit="point")
    try:
        for i, point in enumerate(points):
            pipeline.set_cut_values(dict(zip(names, point.tolist(), strict=True)))
            entry = evaluate()
            history.append({"step": i} | {k: v for k, v in entry.items() if k != "relaxed"})
            if entry["hard"] is not None and _better(
                entry["hard"], None if best is None else best["hard"], objective_fn.maximize
            ):
                best = entry
            bar.update(1)
            if best is not None:
                bar.set_postfix(hard=f"{best['hard']:.4g}")
    finally:
        bar.close()
    final = {"cuts": history[-1]["cuts"], "relaxed": None, "hard": history[-1]["hard"]}
    result = OptimizationResult(
        objective=objective_fn.name,
        initial=_as_point(initial),
        final=_as_point(final),
        best=_as_point(best if best is not None else initial),
        history=tuple(history),
        hard_evaluations=len(points) + 1,
        seconds=time.perf_counter() - start_time,
        device=str(pipeline.cut_low.device),
        extra={"method": method, "budget": budget},
    )
    _write_outputs(pathlib.Path(out_dir), result)
    return result
