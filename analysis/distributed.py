"""Sharded differentiable optimization on ``torch.distributed`` (README, "Scale-out").

``diffana optimize CONFIG --distributed`` runs one process per rank, launched by ``torchrun``
(which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``):

- **Process group.** :func:`init_process_group`: gloo for CPU tensors, NCCL for CUDA ones (each
  rank on ``cuda:LOCAL_RANK``), with a timeout: a rank that never joins or is lost makes every
  other rank fail with a one-line :class:`DistributedError` (``DistStoreError`` /
  ``DistBackendError`` of the timed-out collective) instead of waiting for ever.
- **Sharded events.** :func:`read_shard`: every (file, tree) of the analysis is split into
  ``world_size`` balanced entry ranges, rank ``r`` of ``W`` reading entries
  ``[r n // W, (r + 1) n // W)`` of a file of ``n`` entries (uproot's ``entry_start`` /
  ``entry_stop``, :class:`analysis.io.Partition`), and keeping its events on its device.
- **Histograms are sums over events**, so the relaxed (soft-cut KDE) and the hard histograms of
  all events are the sums of the ranks' histograms: :class:`DistributedPipeline` all-reduces
  (SUM) the yields and sums of ``w^2`` of every template, one flat tensor per call, through
  :func:`all_reduce_sum`, a differentiable all-reduce. Every rank then holds the same
  histograms, and evaluates the same likelihood, objective and hard metric.
- **Gradients.** With ``H = sum_r h_r`` and the same loss ``L(H)`` on every rank, the all-reduce's
  backward passes ``dL/dH`` through unchanged (the derivative of a sum with respect to one of its
  terms is the identity), so rank ``r``'s backward gives ``dL/dH * dh_r/dtheta``, its share of
  the gradient; :meth:`DistributedPipeline.synchronize_gradients` all-reduces (SUM) those shares
  before the optimizer step, giving ``dL/dtheta = sum_r dL/dH * dh_r/dtheta``, the
  single-process gradient, on every rank (so every rank takes the same Adam step).
- **Construction statistics** that must see all events, the cut temperature scales
  (``cut_spread``, a weighted quantile spread), are computed exactly from collectives of a few
  numbers (:func:`column_spread_all_ranks`: sums, and a bisection for each quartile), so no rank
  ever holds more than its own events; the per-rank sort orders only change the order of
  additions.
- **Outputs.** Rank 0 claims the output folder before any rank reads (a folder another run
  holds stops every rank at once) and writes ``result.json``, ``cuts.json`` and the
  checkpoints; ``--resume`` makes every rank read the checkpoint, so ``--out`` must be on a file
  system all nodes see (as for any torchrun checkpoint).

Results equal the single-process run's up to the order of additions (the test asserts 1e-9
relative on ``result.json`` and 1e-10 on the gradients).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from analysis.config import Config
from analysis.errors import AnalysisError, DataError
from analysis.histograms import Histogram
from analysis.io import (
    Events,
    Partition,
    TemplateKey,
    _where,
    read_events,
    split_entries,
    template_key,
    tree_entries,
)
from analysis.optimize import OptimizationResult, claim_output_folder, optimize
from analysis.pipeline import AnalysisPipeline
from analysis.selection import (
    NO_SPREAD_EVENTS,
    QUARTILES,
    spread_from,
    spread_inputs,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "DistributedPipeline",
    "all_reduce_histograms",
    "all_reduce_sum",
    "column_spread_all_ranks",
    "init_process_group",
    "optimize_distributed",
    "read_shard",
    "shard_partitions",
]

DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits for the others (joining, and in every collective) before failing."""

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LOST_MARKERS = ("gloo", "Connection closed", "Connection reset", "NCCL", "timed out", "Timed out")
"""Words of the ``RuntimeError`` messages of collectives whose peer is gone."""


class DistributedError(AnalysisError, RuntimeError):
    """The process group cannot be formed, or a rank was lost (a collective timed out or its
    peer closed the connection)."""


# ----------------------------------------------------------------------------- process group
def init_process_group(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; return this rank's
    device (``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``).

    Backend: NCCL for CUDA, gloo for CPU; ``timeout`` seconds for the rendezvous and every
    collective. Raises :class:`DistributedError` outside torchrun or when the others do not
    join in time."""
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            f"--distributed: {', '.join(missing)} not set; launch with "
            "torchrun --nproc-per-node N $(command -v diffana) optimize ... --distributed"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"--distributed: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not "
            f"join the {backend} process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {timeout:g} s ({_first_line(err)})"
        ) from None
    return device


def _first_line(err: BaseException) -> str:
    """The first sentence of ``err``'s message, without a leading ``[source.cc:N]``."""
    lines = str(err).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(err).__name__
    return text.split(". ")[0].rstrip(".")


# ----------------------------------------------------------------------------- collectives
class _AllReduceSum(torch.autograd.Function):
    """``forward``: the sum over ranks of ``tensor`` (``all_reduce(SUM)`` of a copy);
    ``backward``: the incoming gradient unchanged (module docstring, "Gradients"). ``anchor``
    (the cut parameters) only makes the output part of the graph on a rank whose own share does
    not depend on them (e.g. no event in reach of the bins), so every rank runs the same
    backward; it gets no gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_r tensor_r`` over the ranks, differentiable: its backward passes the gradient to
    this rank's ``tensor`` unchanged (:class:`_AllReduceSum`)."""
    result: torch.Tensor = _AllReduceSum.apply(tensor, anchor)
    return result


def column_spread_all_ranks(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`~analysis.selection.column_spread` of the column of all ranks together, from
    collectives of a few numbers: no rank holds more than its own events.

    The weighted mean, standard deviation and largest value are all-reduced sums (and a max).
    Each weighted quartile ``Q(q)``, the smallest value ``v`` whose cumulative weight fraction
    ``W(v) / W`` reaches ``q`` (inverted CDF), is found by bisection over the float64 numbers in
    their order (:func:`_ordered_key`): ``W(t) = sum_ranks sum_{x_i <= t} w_i`` is a step
    function that jumps at the values, so the smallest ``t`` with ``W(t) / W >= q`` is a value
    of the column, reached in at most 64 halvings, each one all-reduce of two numbers (both
    quartiles) and a ``searchsorted`` in each rank's sorted column. Equal to the single-process
    spread up to the order of the additions in the sums.
    """
    dtype = x.dtype if x.is_floating_point() else torch.float64
    x, w = spread_inputs(x, weights)
    x, order = torch.sort(x)
    w = w[order]
    cumulative = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])  # W_local below position i
    empty = x.numel() == 0
    sums = torch.stack([w.sum(), (w * x).sum(), w.new_tensor(float(x.numel()))])
    dist.all_reduce(sums)
    total, weighted, count = sums.tolist()
    if count == 0:
        raise DataError(NO_SPREAD_EVENTS)
    mean = weighted / total
    variance = (w * (x - mean) ** 2).sum()
    dist.all_reduce(variance)
    ends = torch.full((2,), -torch.inf, dtype=x.dtype, device=x.device)
    if not empty:
        ends = torch.stack([-x[0], x[-1]])
    dist.all_reduce(ends, op=dist.ReduceOp.MAX)  # (-min, max) over all ranks
    smallest, largest = -ends[0], ends[1]
    # bisection on the keys: W(lo) / W < q <= W(hi) / W
    low = [_ordered_key(float(smallest)) - 1] * 2
    high = [_ordered_key(float(largest))] * 2
    q = torch.tensor(QUARTILES, dtype=torch.float64, device=x.device)
    while any(h - lo > 1 for lo, h in zip(low, high, strict=True)):
        middle = [(lo + h) // 2 for lo, h in zip(low, high, strict=True)]
        t = torch.tensor([_key_value(m) for m in middle], dtype=torch.float64, device=x.device)
        below = cumulative[torch.searchsorted(x, t, right=True)]
        dist.all_reduce(below)
        reached = (below / total >= q).tolist()
        for i, (m, ok) in enumerate(zip(middle, reached, strict=True)):
            if high[i] - low[i] > 1:
                high[i], low[i] = (m, low[i]) if ok else (high[i], m)
    lower, upper = (torch.tensor(_key_value(h), dtype=torch.float64, device=x.device) for h in high)
    std = torch.sqrt(variance / total)
    return spread_from(lower, upper, std, largest).to(dtype)


_SIGN_BITS = (1 << 63) - 1


def _ordered_key(value: float) -> int:
    """An integer that orders the float64 numbers as their values (``-0.0`` just below
    ``+0.0``): the IEEE bits as a signed integer, with the magnitude bits of negative numbers
    flipped (their order is reversed)."""
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits if bits >= 0 else bits ^ _SIGN_BITS


def _key_value(key: int) -> float:
    """The float64 number of an :func:`_ordered_key`."""
    bits = key if key >= 0 else key ^ _SIGN_BITS
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def all_reduce_histograms(
    histograms: Mapping[TemplateKey, Histogram], anchor: torch.Tensor
) -> dict[TemplateKey, Histogram]:
    """``histograms`` with yields and sums of w^2 summed over the ranks: one all-reduce
    (:func:`all_reduce_sum`, differentiable) of the concatenation of all of them (keys in the
    same order on every rank: config order); ``anchor``: see :class:`_AllReduceSum`."""
    if not histograms:
        return {}
    keys = list(histograms)
    pairs = [(histograms[key].yields, histograms[key].sumw2) for key in keys]
    parts = [t for pair in pairs for t in pair if t is not None]  # sumw2 None: not computed
    sizes = [t.numel() for t in parts]
    total = all_reduce_sum(torch.cat([t.reshape(-1) for t in parts]), anchor)
    pieces = iter(total.split(sizes))
    return {
        key: Histogram(histograms[key].edges, next(pieces), None if s is None else next(pieces))
        for key, (_, s) in zip(keys, pairs, strict=True)
    }


# ----------------------------------------------------------------------------- sharded reading
def shard_partitions(config: Config, rank: int, world_size: int) -> list[Partition]:
    """This rank's entry range of every (file, tree) the analysis reads, in config order:
    entries ``[rank n // world_size, (rank + 1) n // world_size)`` of a tree of ``n`` entries
    (sizes differ by at most one entry between ranks)."""
    seen: dict[tuple[pathlib.Path, str], Any] = {}
    for template in config.templates():
        for path in template.paths:
            seen.setdefault((path, template.tree), template)
    return [
        split_entries(path, tree, tree_entries(config, path, example), world_size)[rank]
        for (path, tree), example in seen.items()
    ]


def read_shard(
    config: Config,
    rank: int,
    world_size: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[TemplateKey, Events]:
    """The events of this rank's :func:`shard_partitions`, per template (its files' ranges
    concatenated in config order); a template may have no events on a rank."""
    parts: dict[TemplateKey, list[Events]] = {}
    for partition in shard_partitions(config, rank, world_size):
        events = read_events(
            config,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            progress=False,
            partition=partition,
        )
        for key, item in events.items():
            parts.setdefault(key, []).append(item)
    return {key: _concatenated(items) for key, items in parts.items()}


def _concatenated(items: Sequence[Events]) -> Events:
    if len(items) == 1:
        return items[0]
    return Events(
        variable=items[0].variable,
        columns={
            name: torch.cat([item.columns[name] for item in items]) for name in items[0].columns
        },
        weight=torch.cat([item.weight for item in items]),
    )


def _check_selections(config: Config, events: Mapping[TemplateKey, Events], device: Any) -> None:
    """DataError, on every rank, for a template without events on all ranks together (the
    single-process read's "no events after Filter"); a rank's share may be empty."""
    templates = list(config.templates())
    counts = torch.tensor(
        [len(events[template_key(t)]) if template_key(t) in events else 0 for t in templates],
        device=device,
    )
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    for template, count in zip(templates, counts.tolist(), strict=True):
        if count == 0:
            raise DataError(
                f"{_where(template.paths, template.tree)}: {template.label} has no events after "
                f"Filter {template.filter!r}"
            )


# ----------------------------------------------------------------------------- pipeline
class DistributedPipeline(AnalysisPipeline):
    """:class:`~analysis.pipeline.AnalysisPipeline` of one rank's events whose histograms are
    those of all ranks' events (module docstring): built on every rank of an initialized
    process group, with the same configuration."""

    def _column_spread(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The spread of the column of all ranks (:func:`column_spread_all_ranks`)."""
        return column_spread_all_ranks(x, weights)

    def histograms_and_selected_counts(
        self,
        tau: float | torch.Tensor,
        bandwidth: float | torch.Tensor,
        keys: Sequence[TemplateKey],
        *,
        variation_sumw2: bool = True,
    ) -> tuple[dict[TemplateKey, Histogram], dict[TemplateKey, Histogram]]:
        histograms, counts = super().histograms_and_selected_counts(
            tau, bandwidth, keys, variation_sumw2=variation_sumw2
        )
        anchor = self.cut_parameters
        return all_reduce_histograms(histograms, anchor), all_reduce_histograms(counts, anchor)

    def selected_counts(
        self, tau: float | torch.Tensor, keys: Sequence[TemplateKey]
    ) -> dict[TemplateKey, Histogram]:
        return all_reduce_histograms(super().selected_counts(tau, keys), self.cut_parameters)

    def synchronize_gradients(self) -> None:
        """Sum the ranks' shares of the cut gradients (module docstring, "Gradients"); a rank
        whose share is empty (``grad`` None) contributes zeros."""
        if self.cut_parameters.grad is None:
            self.cut_parameters.grad = torch.zeros_like(self.cut_parameters)
        dist.all_reduce(self.cut_parameters.grad, op=dist.ReduceOp.SUM)


# ----------------------------------------------------------------------------- optimize
def optimize_distributed(
    config: Config,
    *,
    out_dir: str | os.PathLike[str],
    objective: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> OptimizationResult:
    """:func:`analysis.optimize.optimize` on this rank's share of the events (module docstring).

    Joins the process group (:func:`init_process_group`; unless one is initialized already,
    which is then used and left as it is), reads this rank's shard, builds the
    :class:`DistributedPipeline` and optimizes; rank 0 writes the outputs (``result.json``
    also records ``"distributed": {"world_size", "backend"}``). Returns the
    :class:`~analysis.optimize.OptimizationResult` on every rank. Raises
    :class:`DistributedError` when a rank is lost (a group it joined is destroyed in any case).
    """
    owned = not dist.is_initialized()
    device = init_process_group(torch.device(device), timeout) if owned else torch.device(device)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        with _lost_rank_errors(rank, world_size, timeout), _claimed_by_rank_0(out_dir, device):
            events = read_shard(config, rank, world_size, device=device, cache_dir=cache_dir)
            _check_selections(config, events, device)
            pipeline = DistributedPipeline(config, events, device=device)
            return optimize(
                config,
                out_dir=out_dir,
                objective=objective,
                steps=steps,
                seed=seed,
                resume=resume,
                device=device,
                progress=progress and rank == 0,
                pipeline=pipeline,
                writer=rank == 0,
                record={"distributed": {"world_size": world_size, "backend": dist.get_backend()}},
                claimed=rank == 0,
            )
    finally:
        if owned:
            dist.destroy_process_group()


@contextlib.contextmanager
def _claimed_by_rank_0(out_dir: str | os.PathLike[str], device: torch.device) -> Iterator[None]:
    """Rank 0 claims ``out_dir`` (:func:`~analysis.optimize.claim_output_folder`) for the block,
    before any rank reads: a folder that another run holds (or that cannot be written) ends
    every rank at once, rank 0 with its one-line error, the others saying so, instead of after
    the reading (minutes at scale)."""
    with contextlib.ExitStack() as stack:
        error: AnalysisError | None = None
        if dist.get_rank() == 0:
            try:
                stack.enter_context(claim_output_folder(out_dir))
            except AnalysisError as err:
                error = err
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.broadcast(failed, 0)
        if error is not None:
            raise error
        if bool(failed):
            raise DistributedError(
                f"--distributed: rank {dist.get_rank()}: rank 0 could not claim the output "
                f"folder {out_dir} (its error says why)"
            )
        yield


@contextlib.contextmanager
def _lost_rank_errors(rank: int, world_size: int, timeout: float) -> Iterator[None]:
    """Turns the errors of a collective whose peer is gone (``torch.distributed.DistError``:
    ``DistBackendError``, ``DistStoreError``, ...; or a ``RuntimeError`` of gloo or NCCL such as
    "Connection closed by peer") into a one-line :class:`DistributedError`."""
    try:
        yield
    except RuntimeError as err:
        lost = isinstance(err, dist.DistError) or any(word in str(err) for word in _LOST_MARKERS)
        if not lost or isinstance(err, AnalysisError):
            raise
        raise DistributedError(
            f"--distributed: rank {rank} of {world_size}: lost contact with another rank (it "
            f"failed, was killed or did not answer within {timeout:g} s): {_first_line(err)}"
        ) from None
