"""Cut optimization by gradient descent, and the grid/random baselines (DESIGN.md, "optimize").

:func:`optimize` runs Adam on the pipeline's unconstrained cut parameters
(:attr:`analysis.pipeline.AnalysisPipeline.cut_parameters`) with the loss
``objective.loss(model, data)`` of the relaxed model at the step's temperature and bandwidth.

**Schedules.** With ``t = step / (steps - 1)`` (``t = 0`` for a single step), the relative cut
temperature goes from ``Temperature.initial`` (``T0``) to ``Temperature.final`` (``T1``)::

    exponential: tau(t) = T0 (T1 / T0)^t      linear: tau(t) = T0 + (T1 - T0) t
    constant:    tau(t) = T0

and the KDE bandwidth (units of the smallest bin width) is annealed by the same factor from
``Optimization.bandwidth``: ``bandwidth(t) = Optimization.bandwidth * tau(t_L) / T0`` (constant
when ``T0 = 0``), in ``L = Optimization.bandwidth_levels`` steps: ``t_L`` is the nearest of
``0, 1/L, ..., 1`` to ``t`` (``L = 0``: ``t_L = t``, a new bandwidth every step). The kernel
values of the KDE depend on the bandwidth alone (not on the cuts), so the pipeline computes them
once per level and the steps in between reuse them
(:class:`~analysis.histograms.KDELayout`): with the default 12 levels a run of 100 steps
evaluates the kernel 13 times instead of 100, and the bandwidth stays within a factor
``(T0 / T1)^(1 / 2L)`` of the continuous schedule (1.14 for the demo's 0.5 -> 0.02). Both knobs
reach their smallest values at the last step; the relaxed objective tends to the hard one as
they go to 0, at the price of noisier, steeper gradients.

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
So does a hard evaluation whose fit does not converge
(:meth:`analysis.likelihood.Model.with_strict_fits`): a fit that stops short of its minimum
makes, e.g., ``q0`` and the significance too large, so its value is never the best point.

**Checkpoints.** Every ``checkpoint_every`` steps ``out_dir/checkpoint.pt`` is written
atomically (pipeline state, Adam state, next step, history, best point, torch RNG state).
``resume=True`` restores all of it and continues; on the same machine the result is the same as
an uninterrupted run (float64, deterministic CPU kernels), also after ``kill -9``. A checkpoint
records the *identity* of its run (:func:`run_identity`): a hash of the configuration (every
field of the :class:`~analysis.config.Config` record except ``source``, the YAML's file name,
as canonical JSON), the objective, the number of steps, the seed, and the content digest of
every input file (:func:`analysis.cache.file_digest`; of the event tensors when ``events`` are
passed in). Resuming with a checkpoint that cannot be read (truncated, not a torch file, another
program's), or of another run (naming what differs), or whose cut values lie outside the
current Bounds is a :class:`~analysis.errors.ConfigError`.

**The output folder** (``out_dir``) belongs to one run at a time, and what it shows is never a
mix of two runs:

1. Before anything is computed, the folder is created and claimed (:func:`claim_output_folder`):
   a probe file is created and removed (a read-only folder, a full disk or a path below a
   regular file fail here, as :class:`~analysis.errors.OutputError`, not at the first
   checkpoint); an exclusive ``fcntl.flock`` on ``out_dir/.lock`` is taken (a second run fails
   at once, naming the pid, host and start time the lock file records) and held until the run
   ends, however it ends (the file is removed then; the system drops the lock when the process
   dies, and the file it leaves is reused); temporary files that a killed run left
   (``.result.json.*.tmp``, ``.cuts.json.*.tmp``, ``.checkpoint.pt.*.tmp``) are removed.
2. Once the inputs are read (and a resumed checkpoint accepted), the previous outputs are
   removed, ``result.json`` first: a new run also removes ``checkpoint.pt``; a resumed one
   keeps it.
3. At the end ``cuts.json`` is written, then ``result.json`` (each atomically: whole or absent).
   ``result.json`` is the completion marker: it only exists once the ``cuts.json`` beside it is
   complete and from the same run, and its ``best.cuts`` equals that ``cuts.json``. A reader
   that sees no ``result.json`` must treat the folder as unfinished.

So after a kill at any instant the folder holds either no ``result.json`` (with or without a
new ``cuts.json``), or this run's ``result.json`` and ``cuts.json``; never a ``result.json``
beside a missing or older ``cuts.json``. ``resume=True`` (or a new run) then completes it.
The lock is advisory (it stops diffana runs, not other programs) and needs a file system with
``flock`` (local ones; NFS emulates it with POSIX locks).

:func:`scan_cuts` is the baseline: the same trainable cuts, hard evaluations only, on a grid or
at uniform random points within each cut's Bounds, same output files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import pickle
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch

from analysis import mc_statistics
from analysis.cache import file_digest
from analysis.config import Config, Temperature
from analysis.errors import ConfigError, DataError, InputFileError, OutputError
from analysis.files import check_writable, json_text, write_atomically
from analysis.fit import FitError
from analysis.inference import InferenceError
from analysis.io import Events, TemplateKey
from analysis.objectives import Objective, get_objective
from analysis.pipeline import AnalysisPipeline
from analysis.progress import progress_bar

__all__ = [
    "OptimizationResult",
    "Point",
    "claim_output_folder",
    "config_digest",
    "events_digest",
    "hard_metric",
    "optimize",
    "run_identity",
    "scan_cuts",
    "schedule",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CUTS = "cuts.json"
LOCK = ".lock"
CHECKPOINT_FORMAT = "diffana optimize checkpoint 3"
"""The ``format`` entry of a checkpoint; a file without it is refused on resume. (3: the
pipeline's ``cut_fixed_values`` holds the non-trainable cuts only.)"""


@dataclass(frozen=True)
class Point:
    """Cut values (all cuts, ``cuts.json`` format) with the relaxed and hard metric there
    (``None`` where not evaluated), and the bins whose background MC is below the guard at
    these cuts (:func:`analysis.mc_statistics.below_guard`; empty when it holds)."""

    cuts: Mapping[str, float]
    relaxed: float | None
    hard: float | None
    below_guard: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "cuts": dict(self.cuts),
            "relaxed": self.relaxed,
            "hard": self.hard,
            "below_guard": [dict(b) for b in self.below_guard],
        }


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


@dataclass
class RunState:
    """The progress of an optimization: with the pipeline's and Adam's states and the run's
    identity, exactly what a checkpoint holds (:meth:`checkpoint`, :meth:`from_checkpoint`).

    ``step``: the next step; ``history``: one entry per step taken; ``initial``, ``best``: points
    as ``{"cuts", "relaxed", "hard"[, "below_guard"]}``; ``hard_evaluations``; ``seconds``
    spent before this process (resumed runs); ``rng``: torch's RNG state at ``step``.
    """

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    hard_evaluations: int = 0
    seconds: float = 0.0

    def offer(self, entry: Mapping[str, Any], maximize: bool) -> None:
        """Keep ``entry`` as the best point if its hard value is finite, none of its bins is
        below the MC-statistics guard, and it is better than the best so far."""
        hard = entry.get("hard")
        if hard is None or entry.get("below_guard"):
            return
        if _better(hard, None if self.best is None else self.best["hard"], maximize):
            self.best = _point(entry)

    def checkpoint(
        self,
        identity: Mapping[str, Any],
        pipeline: AnalysisPipeline,
        optimizer: torch.optim.Optimizer,
        seconds: float,
    ) -> dict[str, Any]:
        """The checkpoint of this state (``seconds``: the run's total so far)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": dict(identity),
            "pipeline": pipeline.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "best": self.best,
            "initial": self.initial,
            "hard_evaluations": self.hard_evaluations,
            "seconds": seconds,
            "rng": torch.get_rng_state(),
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        """The run state of a checkpoint (:meth:`checkpoint`); raises KeyError, TypeError or
        ValueError for entries of the wrong kind."""
        return cls(
            step=int(state["step"]),
            history=list(state["history"]),
            initial=state["initial"],
            best=state["best"],
            hard_evaluations=int(state["hard_evaluations"]),
            seconds=float(state["seconds"]),
        )


# ----------------------------------------------------------------------------- pure pieces
def schedule(
    step: int, steps: int, temperature: Temperature, bandwidth: float, levels: int = 0
) -> tuple[float, float]:
    """``(tau, bandwidth)`` at ``step`` of ``steps`` (module docstring, "Schedules");
    ``levels`` > 0: the bandwidth in ``levels`` steps (``Optimization.BandwidthLevels``)."""
    t = step / (steps - 1) if steps > 1 else 0.0
    tau = _temperature_at(t, temperature)
    if levels > 0:  # the nearest of t = 0, 1/L, ..., 1
        t = math.floor(t * levels + 0.5) / levels
    t0 = temperature.initial
    factor = _temperature_at(t, temperature) / t0 if t0 > 0 else 1.0
    return float(tau), float(bandwidth * factor)


def _temperature_at(t: float, temperature: Temperature) -> float:
    """The relative cut temperature at progress ``t`` in [0, 1] of a run."""
    t0, t1 = temperature.initial, temperature.final
    if temperature.schedule == "constant":
        return t0
    if temperature.schedule == "linear":
        return t0 + (t1 - t0) * t
    if temperature.schedule == "exponential":
        if t0 <= 0 or t1 <= 0:
            raise ConfigError(
                f"Optimization.Temperature: an exponential schedule needs Initial > 0 and "
                f"Final > 0, got {t0} and {t1}"
            )
        return t0 * (t1 / t0) ** t
    raise ConfigError(
        f"Optimization.Temperature.Schedule: unknown schedule {temperature.schedule!r}; "
        "expected exponential, linear or constant"
    )


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
        return float(objective(pipeline.likelihood(pipeline.histograms(0.0, 0.0)), None))


NUMERICAL_ERRORS = (FitError, InferenceError, DataError)
"""Failures of one evaluation (a fit that cannot start, a sample with no yield left): that
point gets no value (``null``) and the cause in its history entry; the run goes on."""


def _evaluate_hard(pipeline: AnalysisPipeline, objective: Objective) -> dict[str, Any]:
    """The hard evaluation of the current point (module docstring, "Honest evaluation"):
    ``{"hard": value}`` (``None`` when it is not finite or fails, with ``"hard_error"``: the
    cause), and ``"below_guard"``: the bins whose background MC is below the guard
    (:func:`analysis.mc_statistics.below_guard`), when there are any."""
    config = pipeline.config
    out: dict[str, Any] = {}
    with torch.no_grad():
        histograms = pipeline.histograms(0.0, 0.0)
        n_eff = mc_statistics.background_effective_events(config, histograms)
        below = mc_statistics.below_guard(config, n_eff, config.optimization.min_effective_events)
        try:
            # strict: an unconverged fit's value (a significance too large) is not a result
            value = float(objective(pipeline.likelihood(histograms).with_strict_fits(), None))
        except NUMERICAL_ERRORS as err:
            log.warning("hard evaluation at %s failed: %s", pipeline.cut_values(), err)
            out = {"hard": None, "hard_error": str(err)}
        else:
            finite = math.isfinite(value)
            out = {"hard": value if finite else None}
            if not finite:
                out["hard_error"] = f"hard {objective.name} is {value}"
    if below:
        out["below_guard"] = below
    return out


def relaxed_loss(
    pipeline: AnalysisPipeline, objective: Objective, tau: float, bandwidth: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(value, guard, loss)`` of the relaxed pipeline at ``tau`` and ``bandwidth``: the
    objective's value, the MC-statistics guard factor ``g`` (``None`` when the guard is off;
    :func:`analysis.mc_statistics.guard_factor` of the expected yields and sums of w^2 of the
    hard selection in the ordinary bins, :meth:`AnalysisPipeline.selected_counts`: the KDE's
    smoothing would fill the holes that the hard histograms have) and the loss to minimise,
    ``-value * g`` for an objective to maximize and ``value / g`` otherwise
    (:func:`analysis.mc_statistics.guarded`). The soft cuts are evaluated once for both
    (:meth:`AnalysisPipeline.histograms_and_selected_counts`).
    """
    config = pipeline.config
    minimum = config.optimization.min_effective_events
    keys = mc_statistics.background_templates(config) if minimum > 0 else []
    # the workspace's staterror takes the nominal sums of w^2 only: the variations' are skipped
    histograms, counts = pipeline.histograms_and_selected_counts(
        tau, bandwidth, keys, variation_sumw2=False
    )
    value = objective(pipeline.likelihood(histograms), None)
    guard = None
    if minimum > 0:  # n_eff of the expected hard selection (pipeline.selected_counts)
        n_eff = mc_statistics.background_effective_events(config, counts)
        guard = mc_statistics.guard_factor(n_eff, minimum)
    penalised = mc_statistics.guarded(value, guard, objective.maximize)
    return value, guard, -penalised if objective.maximize else penalised


def _gradient_step(
    pipeline: AnalysisPipeline, optimizer: torch.optim.Optimizer, loss: torch.Tensor
) -> str | None:
    """Backpropagate ``loss`` and take one optimizer step, unless the loss or a gradient is not
    finite: then nothing changes and the cause is returned (``None`` when the step was taken)."""
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss.detach())):
        return f"loss is {float(loss.detach())}"
    loss.backward()
    pipeline.synchronize_gradients()
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
def _remove(path: pathlib.Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise OutputError.from_os_error(path, err, "cannot remove") from err


@contextlib.contextmanager
def claim_output_folder(out_dir: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Create ``out_dir``, check that it is writable and hold it for one run (module docstring,
    "The output folder", step 1); yields the folder as a path.

    The lock is an exclusive ``fcntl.flock`` on ``out_dir/.lock``, released when the block
    exits (also by an exception: the file is removed) or the process dies (the file stays and
    is reused); the file records ``pid``, ``host`` and ``since`` (local time, ISO 8601) of its
    holder. Raises
    :class:`~analysis.errors.OutputError`: ``"<out_dir> is in use by another diffana run (pid N
    on HOST since TIME)"`` when another run holds it, or a fault of the operating system.
    """
    out = pathlib.Path(out_dir)
    check_writable(out / RESULT)
    lock_path = out / LOCK
    fd = _lock(out, lock_path)
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json_text(holder, indent=None).encode("utf-8"), 0)
            for name in (RESULT, CUTS, CHECKPOINT):  # left by a killed write_atomically
                for stale in out.glob(f".{name}.*.tmp"):
                    _remove(stale)
        except OSError as err:
            if isinstance(err, OutputError):
                raise
            raise OutputError.from_os_error(lock_path, err) from err
        log.debug("claimed %s (%s)", out, holder)
        yield out
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still held: see _lock
        os.close(fd)  # releases the lock


def _lock(out: pathlib.Path, lock_path: pathlib.Path) -> int:
    """Open ``lock_path`` and take an exclusive ``flock`` on it without waiting; return the
    descriptor. A holder removes the file before it lets go, so a lock taken on a file that is
    no longer at ``lock_path`` (removed between this ``open`` and this ``flock``) is dropped
    and taken again on the new file: two runs never hold locks on different files."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError.from_os_error(lock_path, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"{out} is in use by another diffana run{holder}") from None
        except OSError as err:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            raise OutputError.from_os_error(lock_path, err, "cannot lock") from err
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """`` (pid N on HOST since TIME)`` from the lock file, or ``""`` when it cannot be read (its
    holder may be writing it at this instant)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f" (pid {holder['pid']} on {holder['host']} since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _write_outputs(out_dir: pathlib.Path, result: OptimizationResult) -> None:
    """Publish (module docstring, "The output folder", step 3): no ``result.json`` while
    ``cuts.json`` changes, then ``cuts.json``, then ``result.json``, the completion marker."""
    _remove(out_dir / RESULT)
    write_atomically(out_dir / CUTS, json_text(dict(result.best.cuts)))
    write_atomically(out_dir / RESULT, json_text(result.to_dict()))
    log.info("wrote %s and %s", out_dir / RESULT, out_dir / CUTS)


# ----------------------------------------------------------------------------- run identity
def _digest_text(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def config_digest(config: Config) -> str:
    """Hash of the canonical JSON of every field of ``config`` but ``source`` (the YAML's file
    name, which changes no result): ``dataclasses.asdict``, keys sorted, floats as Python's
    shortest round-trip text."""
    record = dataclasses.asdict(config)
    record.pop("source", None)
    return _digest_text(json.dumps(record, sort_keys=True, default=str, separators=(",", ":")))


def events_digest(events: Mapping[TemplateKey, Events]) -> str:
    """Hash of event tensors passed in directly: per template key (sorted) the observable's
    name, then each column (sorted by name) and the weight as dtype, shape and raw bytes."""
    digest = hashlib.blake2b(digest_size=16)

    def tensor(value: torch.Tensor) -> None:
        data = value.detach().contiguous().cpu()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())

    for key in sorted(events):
        item = events[key]
        digest.update(json.dumps([list(key), item.variable, sorted(item.columns)]).encode())
        for name in sorted(item.columns):
            tensor(item.columns[name])
        tensor(item.weight)
    return digest.hexdigest()


def run_identity(
    config: Config,
    objective: str,
    steps: int,
    seed: int,
    events: Mapping[TemplateKey, Events] | None = None,
) -> dict[str, Any]:
    """What defines an optimization run, as a checkpoint records it: ``configuration``
    (:func:`config_digest`), ``objective``, ``steps``, ``seed``, ``inputs`` (``{"files": {path:
    digest}}`` over the union of ``template.paths`` of ``config.templates()``, or ``{"events":
    digest}`` (:func:`events_digest`) for ``events`` passed in) and ``run``, a hash of all
    of them."""
    if events is None:
        paths = sorted({str(path) for t in config.templates() for path in t.paths})
        inputs: dict[str, Any] = {"files": {path: file_digest(path) for path in paths}}
    else:
        inputs = {"events": events_digest(events)}
    parts = {
        "configuration": config_digest(config),
        "objective": objective,
        "steps": steps,
        "seed": seed,
        "inputs": inputs,
    }
    return parts | {"run": _digest_text(json.dumps(parts, sort_keys=True))}


def _identity_differences(saved: Any, current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and this run's, for a message."""
    if not isinstance(saved, Mapping):
        return ["the run identity"]
    out = []
    if saved.get("configuration") != current["configuration"]:
        out.append("the configuration")
    for key in ("objective", "steps", "seed"):
        if saved.get(key) != current[key]:
            out.append(f"the {key} (checkpoint: {saved.get(key)!r}, now: {current[key]!r})")
    old, new = saved.get("inputs"), current["inputs"]
    if old != new:
        if isinstance(old, Mapping) and isinstance(old.get("files"), Mapping) and "files" in new:
            changed = sorted(
                path
                for path in set(old["files"]) | set(new["files"])
                if old["files"].get(path) != new["files"].get(path)
            )
            out.append("the input files (" + ", ".join(changed) + ")")
        else:
            out.append("the input events")
    if not out and saved.get("run") != current["run"]:
        out.append("the run identity")
    return out


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
    pipeline: AnalysisPipeline | None = None,
    writer: bool = True,
    record: Mapping[str, Any] | None = None,
    claimed: bool = False,
) -> OptimizationResult:
    """Optimize the trainable cuts of ``config`` (module docstring); write ``result.json`` and
    ``cuts.json`` to ``out_dir`` and return the result.

    ``objective``, ``steps`` and ``seed`` override ``config.optimization``. ``callback`` is
    called with each step's history entry (after that step's checkpoint, if any).
    ``pipeline``: a pipeline built already (default: from ``config`` and ``events``);
    ``writer=False``: neither claim nor write ``out_dir`` (read only its checkpoint on
    ``resume``): the ranks other than 0 of :mod:`analysis.distributed`; ``claimed``: the
    caller holds the claim on ``out_dir`` already (:func:`claim_output_folder`; rank 0 of
    :mod:`analysis.distributed` takes it before reading); ``record``: more top-level entries of
    ``result.json`` (e.g. ``{"distributed": {...}}``).
    Raises ConfigError for an unknown objective, no trainable cut, ``steps < 1`` or a checkpoint
    that cannot be read or does not belong to this run; InputFileError when ``resume`` finds no
    checkpoint; OutputError when ``out_dir`` cannot be written or another run holds it.
    """
    settings = config.optimization
    objective_fn = get_objective(objective or settings.objective)
    steps = settings.steps if steps is None else steps
    seed = settings.seed if seed is None else seed
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    claim = (
        claim_output_folder(out_dir)
        if writer and not claimed
        else contextlib.nullcontext(pathlib.Path(out_dir))
    )
    with claim as out:
        return _optimize(
            config,
            objective_fn,
            steps=steps,
            seed=seed,
            out=out,
            events=events,
            resume=resume,
            device=device,
            progress=progress,
            cache_dir=cache_dir,
            callback=callback,
            pipeline=pipeline,
            writer=writer,
            record=record,
        )


def _optimize(
    config: Config,
    objective_fn: Objective,
    *,
    steps: int,
    seed: int,
    out: pathlib.Path,
    events: Mapping[TemplateKey, Events] | None,
    resume: bool,
    device: torch.device | str,
    progress: bool,
    cache_dir: str | os.PathLike[str] | None,
    callback: Callable[[Mapping[str, Any]], None] | None,
    pipeline: AnalysisPipeline | None = None,
    writer: bool = True,
    record: Mapping[str, Any] | None = None,
) -> OptimizationResult:
    """:func:`optimize` in the claimed folder ``out`` (``writer=False``: without writing)."""
    settings = config.optimization
    evaluate_every = max(1, int(settings.evaluate_every))
    checkpoint_every = max(1, int(settings.checkpoint_every))
    start_time = time.perf_counter()
    if pipeline is None:
        pipeline = AnalysisPipeline.from_config(config, events, device=device, cache_dir=cache_dir)
    if not pipeline.trainable_cut_names:
        raise ConfigError(f"{config.source}: no trainable cut to optimize")
    optimizer = torch.optim.Adam([pipeline.cut_parameters], lr=settings.learning_rate)
    # only needed for a resume or a checkpoint (hashing the input files reads them once more);
    # then taken right after the inputs were read
    identity = functools.cache(lambda: run_identity(config, objective_fn.name, steps, seed, events))
    if resume or (writer and checkpoint_every < steps):
        identity()

    run = RunState()
    maximize = objective_fn.maximize
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if resume:
            path = out / CHECKPOINT
            state = _load_checkpoint(path, identity(), pipeline.cut_low.device)
            try:
                pipeline.load_state_dict(state["pipeline"])
                optimizer.load_state_dict(state["optimizer"])
                run = RunState.from_checkpoint(state)
                torch.set_rng_state(state["rng"].cpu())
            except (
                AttributeError,
                KeyError,
                IndexError,
                TypeError,
                ValueError,
                RuntimeError,
            ) as err:
                raise ConfigError(
                    f"{path}: checkpoint does not fit this analysis ({_first_line(err)})"
                ) from None
            _check_restored_cuts(path, config, pipeline.cut_values())
            log.info("resuming %s at step %d of %d", path, run.step, steps)
        written = (RESULT, CUTS) if resume else (RESULT, CUTS, CHECKPOINT)
        for name in written if writer else ():
            _remove(out / name)  # module docstring, "The output folder", step 2

        bar = progress_bar(
            steps, objective_fn.name, enabled=progress, initial=run.step, unit="step"
        )
        try:
            for step in range(run.step, steps):
                tau, bandwidth = schedule(
                    step, steps, settings.temperature, settings.bandwidth, settings.bandwidth_levels
                )
                entry: dict[str, Any] = {
                    "step": step,
                    "tau": tau,
                    "bandwidth": bandwidth,
                    "cuts": pipeline.cut_values(),
                }
                failure: str | None = None
                try:
                    value, guard, loss = relaxed_loss(pipeline, objective_fn, tau, bandwidth)
                except NUMERICAL_ERRORS as err:
                    value, guard, loss = torch.tensor(math.nan), None, torch.tensor(math.nan)
                    failure = f"relaxed evaluation failed: {err}"
                relaxed = float(value.detach())
                entry["relaxed"] = _finite_or_none(relaxed)
                if guard is not None:
                    entry["guard"] = float(guard.detach())
                if step % evaluate_every == 0:
                    entry |= _evaluate_hard(pipeline, objective_fn)
                    run.hard_evaluations += 1
                    run.offer(entry, maximize)
                if run.initial is None:
                    run.initial = _point(entry)
                cause = failure or _gradient_step(pipeline, optimizer, loss)
                if cause is not None:
                    entry["rejected"] = cause
                    log.warning("step %d rejected: %s", step, cause)
                run.history.append(entry)
                run.step = step + 1
                bar.update(1)
                bar.set_postfix(
                    relaxed=f"{relaxed:.4g}",
                    hard=f"{run.best['hard']:.4g}" if run.best is not None else "-",
                )
                if writer and run.step % checkpoint_every == 0 and run.step < steps:
                    seconds = run.seconds + time.perf_counter() - start_time
                    state = run.checkpoint(identity(), pipeline, optimizer, seconds)
                    write_atomically(out / CHECKPOINT, functools.partial(torch.save, state))
                    log.debug("checkpoint %s at step %d", out / CHECKPOINT, run.step)
                if callback is not None:
                    callback(entry)
        finally:
            bar.close()

        tau, bandwidth = schedule(
            steps - 1, steps, settings.temperature, settings.bandwidth, settings.bandwidth_levels
        )
        try:
            with torch.no_grad():
                relaxed = float(relaxed_loss(pipeline, objective_fn, tau, bandwidth)[0])
        except NUMERICAL_ERRORS as err:
            log.warning("relaxed evaluation of the final point failed: %s", err)
            relaxed = math.nan
        final: dict[str, Any] = {"cuts": pipeline.cut_values(), "relaxed": _finite_or_none(relaxed)}
        final |= _evaluate_hard(pipeline, objective_fn)
        run.hard_evaluations += 1
        run.offer(final, maximize)
        _warn_if_stalled(config, run, final)
    best = _reported_best(run)
    result = OptimizationResult(
        objective=objective_fn.name,
        initial=_as_point(cast(dict[str, Any], run.initial)),
        final=_as_point(final),
        best=_as_point(best),
        history=tuple(run.history),
        hard_evaluations=run.hard_evaluations,
        seconds=run.seconds + time.perf_counter() - start_time,
        device=str(pipeline.cut_low.device),
        extra=_mc_statistics_record(pipeline, cast(dict[str, Any], run.initial), best)
        | dict(record or {}),
    )
    if writer:
        _write_outputs(out, result)
    return result


#: a run whose trainable cuts all moved less than this fraction of their Bounds has stalled
STALLED_FRACTION = 1e-6


def _warn_if_stalled(config: Config, run: RunState, final: Mapping[str, Any]) -> None:
    """Warn when no trainable cut moved (by :data:`STALLED_FRACTION` of its Bounds) from the
    initial to the final point: a run that looks alive (its relaxed values change with the
    temperature) but whose gradient vanished, e.g. under a guard discount of 1e-31 when most
    bins are below the guard (Adam's steps then round to nothing)."""
    initial = cast(dict[str, Any], run.initial)
    cuts = [cut for cut in config.cuts if cut.trainable]
    if not run.history or not cuts:
        return
    moved = max(
        abs(final["cuts"][cut.name] - initial["cuts"][cut.name]) / (cut.bounds[1] - cut.bounds[0])
        for cut in cuts
    )
    if moved >= STALLED_FRACTION:
        return
    guards = [entry["guard"] for entry in run.history if "guard" in entry]
    cause = (
        f"; the MC-statistics guard discounted the objective by as much as {min(guards):.3g} "
        "(Optimization.MinEffectiveEvents: lower it or simulate more background)"
        if guards and min(guards) < 1e-6
        else ""
    )
    log.warning(
        "the trainable cuts did not move in %d steps (at most %.2g of their Bounds): the "
        "gradient vanished%s",
        len(run.history),
        moved,
        cause,
    )


def _reported_best(run: RunState) -> dict[str, Any]:
    """The best point; without any eligible one (no finite hard value at a point that keeps the
    guard), the initial point (:func:`_mc_statistics_record` warns)."""
    return run.best if run.best is not None else cast(dict[str, Any], run.initial)


def _point(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The point of a history entry (module docstring, "Honest evaluation")."""
    return {
        "cuts": dict(entry["cuts"]),
        "relaxed": entry.get("relaxed"),
        "hard": entry.get("hard"),
        "below_guard": list(entry.get("below_guard", [])),
    }


def _as_point(entry: Mapping[str, Any]) -> Point:
    return Point(
        cuts=dict(entry["cuts"]),
        relaxed=entry.get("relaxed"),
        hard=entry.get("hard"),
        below_guard=tuple(entry.get("below_guard", ())),
    )


def _mc_statistics_record(
    pipeline: AnalysisPipeline, initial: Mapping[str, Any], best: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"mc_statistics": {...}}`` for ``result.json``: the guard's setting and, at the initial
    and the best cuts, the effective MC events per bin of every background sample and of their
    sum (:func:`analysis.mc_statistics.effective_events_table`, hard histograms). Warns about
    every bin below the guard at either point. Leaves the pipeline at the best cuts."""
    config = pipeline.config
    minimum = config.optimization.min_effective_events
    tables = {}
    for name, point in (("initial", initial), ("best", best)):
        pipeline.set_cut_values(point["cuts"])
        with torch.no_grad():
            tables[name] = mc_statistics.effective_events_table(
                config, pipeline.histograms(0.0, 0.0)
            )
    points = [("initial cuts", initial)]
    if best["cuts"] != initial["cuts"]:
        points.append(("best cuts", best))
    elif initial.get("below_guard"):
        points = [("initial cuts, reported as best: no evaluated point keeps the guard", initial)]
    for where, point in points:
        if point.get("below_guard"):
            log.warning(mc_statistics.guard_warning(minimum, where, point["below_guard"]))
    return {"mc_statistics": {"min_effective_events": minimum, "effective_events": tables}}


_CHECKPOINT_KEYS = frozenset(
    {"format", "identity", "pipeline", "optimizer", "step", "history", "best", "initial"}
    | {"hard_evaluations", "seconds", "rng"}
)


def _first_line(err: BaseException | str, limit: int = 120) -> str:
    """The first sentence of the first line of an error message, at most ``limit`` characters."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_failure(content: bytes, err: Exception) -> str:
    """Why ``torch.load`` could not read ``content``, in a few words: torch's own message of
    several paragraphs (which suggests loading with ``weights_only=False``) is cut to its
    cause."""
    if not content:
        return "the file is empty"
    text = str(err)
    marker = "WeightsUnpickler error:"
    if isinstance(err, pickle.UnpicklingError) and marker in text:
        return "torch.load: " + _first_line(text.split(marker, 1)[1])
    return "torch.load: " + _first_line(err)


def _load_checkpoint(
    path: pathlib.Path, identity: Mapping[str, Any], device: torch.device
) -> dict[str, Any]:
    """The checkpoint at ``path``, if it is one of this run (module docstring, "Checkpoints").

    Messages: ``"<path>: no checkpoint to resume from"`` (InputFileError), ``"<path>: cannot
    read the checkpoint (<reason>)"`` (InputFileError), ``"<path>: not a valid checkpoint
    (<reason>); rerun without --resume"`` and ``"<path>: the checkpoint is of another run: it
    differs in <what>; rerun without --resume or choose another --out"`` (ConfigError).
    """
    if not path.is_file():
        raise InputFileError(f"{path}: no checkpoint to resume from")
    try:
        content = path.read_bytes()  # small; torch.load's own reads fail alike on bad content
    except OSError as err:
        raise InputFileError(
            f"{path}: cannot read the checkpoint ({err.strerror or _first_line(err)})"
        ) from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(content), map_location=device, weights_only=True)
    except Exception as err:  # torch.load raises many kinds (even OSError) for a foreign file
        reason = _load_failure(content, err)
        raise ConfigError(
            f"{path}: not a valid checkpoint ({reason}); rerun without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(repr(k)[:40] for k in state) if isinstance(state, dict) else []
        found = (
            f"keys {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise ConfigError(
            f"{path}: not a valid checkpoint (not written by this version of diffana optimize: "
            f"{found}); rerun without --resume"
        )
    if missing := sorted(_CHECKPOINT_KEYS - state.keys()):
        raise ConfigError(
            f"{path}: not a valid checkpoint (no {', '.join(missing)}); rerun without --resume"
        )
    if differences := _identity_differences(state["identity"], identity):
        raise ConfigError(
            f"{path}: the checkpoint is of another run: it differs in "
            f"{', '.join(differences)}; rerun without --resume or choose another --out"
        )
    return state


def _check_restored_cuts(path: pathlib.Path, config: Config, values: Mapping[str, float]) -> None:
    """ConfigError unless every restored cut value is finite and within its current Bounds."""
    for cut in config.cuts:
        value = values.get(cut.name, math.nan)
        low, high = cut.bounds
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(
                f"{path}: restored cut '{cut.name}' = {value!r} is outside its Bounds "
                f"[{low}, {high}]; rerun without --resume"
            )


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
    scanned point, ``best`` the best by the hard metric among the points that keep the
    MC-statistics guard; ``relaxed`` is ``null`` everywhere. History entries: ``step``, ``cuts``,
    ``hard`` (and ``hard_error``, ``below_guard`` where they apply).
    """
    settings = config.optimization
    objective_fn = get_objective(objective or settings.objective)
    seed = settings.seed if seed is None else seed
    with claim_output_folder(out_dir) as out:
        start_time = time.perf_counter()
        pipeline = AnalysisPipeline.from_config(config, events, device=device, cache_dir=cache_dir)
        names = pipeline.trainable_cut_names
        if not names:
            raise ConfigError(f"{config.source}: no trainable cut to scan")
        cuts = {cut.name: cut for cut in config.cuts}
        points = scan_points([cuts[name].bounds for name in names], method, budget, seed)
        for name in (RESULT, CUTS):
            _remove(out / name)  # module docstring, "The output folder", step 2

        def evaluate() -> dict[str, Any]:
            return {"cuts": pipeline.cut_values(), "relaxed": None} | _evaluate_hard(
                pipeline, objective_fn
            )

        initial = evaluate()
        run = RunState(initial=initial, hard_evaluations=len(points) + 1)
        run.offer(initial, objective_fn.maximize)
        bar = progress_bar(
            len(points), f"{method} {objective_fn.name}", enabled=progress, unit="point"
        )
        try:
            for i, point in enumerate(points):
                pipeline.set_cut_values(dict(zip(names, point.tolist(), strict=True)))
                entry = evaluate()
                run.history.append({"step": i} | {k: v for k, v in entry.items() if k != "relaxed"})
                run.offer(entry, objective_fn.maximize)
                bar.update(1)
                if run.best is not None:
                    bar.set_postfix(hard=f"{run.best['hard']:.4g}")
        finally:
            bar.close()
        final = {"relaxed": None} | run.history[-1]
        best = _reported_best(run)
        result = OptimizationResult(
            objective=objective_fn.name,
            initial=_as_point(initial),
            final=_as_point(final),
            best=_as_point(best),
            history=tuple(run.history),
            hard_evaluations=run.hard_evaluations,
            seconds=time.perf_counter() - start_time,
            device=str(pipeline.cut_low.device),
            extra={"method": method, "budget": budget}
            | _mc_statistics_record(pipeline, initial, best),
        )
        _write_outputs(out, result)
    return result
