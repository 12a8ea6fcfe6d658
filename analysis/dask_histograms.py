"""Hard histograms and cut flows on a Dask cluster (``diffana histograms|workspace|cutflow
--dask [ADDRESS]``).

The events of every (file, tree) are split into partitions of at most ``partition_size``
entries, balanced within the file (``n`` entries in ``ceil(n / size)`` ranges
``[i n // k, (i + 1) n // k)``, uproot's ``entry_start`` and ``entry_stop``). Each partition is
one task on a worker that runs the single-process code on its entries: it reads them with
:func:`analysis.io.read_events` (``partition=``; only the branches the expressions use, the
Filter, Definitions and Weights evaluated there, the column cache keyed by file content and
entry range), then fills the hard histograms with :func:`analysis.histograms.hard_histograms`
and, for a cut flow, adds up :func:`analysis.cutflow.cut_flow_sums`. What a task returns is
small (float64 sums per bin and step, and the event count per template); the scheduler adds
them in a tree of ``FAN_IN``-way sums (the reduction of ``dask.bag.Bag.fold`` or
dask-histogram, done with futures), so only one sum reaches the client.

Bin sums are additive over disjoint sets of events, so the result is the single-process one up
to the order of the float64 additions (relative differences of a few 1e-16 per bin, unless a
bin's weights nearly cancel). The tree has a fixed shape (partitions in file order), so the
result does not depend on which worker finishes first.

Errors are those of the single-process read, raised on a worker and re-raised here by
dask.distributed (the exception is pickled), so the CLI prints the same one-line message and
exits 2; a template without any event after its Filter, over all its partitions, is the same
:class:`~analysis.errors.DataError` as :func:`analysis.io.read_events` raises. A scheduler that
cannot be reached within ``timeout`` seconds is a :class:`SchedulerError`.

Without an address :func:`dask_client` starts a ``distributed.LocalCluster`` (worker
processes, one thread each, closed at the end); with one it connects to a running scheduler,
e.g. of a dask-jobqueue ``SLURMCluster`` or ``HTCondorCluster`` (README, Scale-out: Dask). The
input files and the cache folder must be readable by the workers under the same paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from analysis import mc_statistics
from analysis.config import Config, Template
from analysis.cutflow import CutFlow, StepSums, cut_flow, cut_flow_sums
from analysis.errors import AnalysisError, DataError
from analysis.histograms import Histogram, hard_histograms
from analysis.io import (
    Partition,
    TemplateKey,
    read_events,
    split_entries,
    template_key,
    tree_entries,
)

if TYPE_CHECKING:
    from distributed import Client

DEFAULT_PARTITION_SIZE = 500_000
"""Entries per partition (``--dask-partition-size``): a task's columns stay well below 1 GiB
(the selected float64 columns of half a million events), and the fixed cost of a task (some
milliseconds: scheduling, opening the file) stays small against reading them."""

LOCAL_WORKERS = 2
"""Workers of the ``LocalCluster`` started without a scheduler address."""

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a scheduler given by address."""

FAN_IN = 8
"""Partial sums added per reduction task (the ``split_every`` of a dask tree reduction)."""


class SchedulerError(AnalysisError, ConnectionError):
    """The Dask scheduler given by ``--dask ADDRESS`` cannot be reached."""


@dataclass(frozen=True)
class CutSetSums:
    """The summed results at one set of cut values: hard ``histograms`` of every template,
    and the cut-flow sums (:func:`analysis.cutflow.cut_flow_sums`) of the nominal templates
    when asked for (else empty)."""

    histograms: dict[TemplateKey, Histogram]
    flows: dict[TemplateKey, StepSums]


@contextlib.contextmanager
def dask_client(
    address: str | None,
    *,
    workers: int = LOCAL_WORKERS,
    timeout: float = CONNECT_TIMEOUT,
) -> Iterator[Client]:
    """A ``distributed.Client``: connected to the scheduler at ``address``, or (None) to a new
    ``LocalCluster`` of ``workers`` processes with one thread each, closed on exit.

    The local workers get glibc's default ``malloc`` trimming: dask's nannies set
    ``MALLOC_TRIM_THRESHOLD_=65536`` (config ``distributed.nanny.pre-spawn-environ``), which
    also turns off glibc's adaptive mmap threshold, so every column array of a partition is
    mapped and unmapped afresh; measured on the demo at 1e6 events, reading was 1.4x slower
    with it (README, Scale-out: Dask, for remote workers)."""
    import dask
    from distributed import Client, LocalCluster

    if address is None:
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address="127.0.0.1:0",  # metrics only, on a free local port
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.CRITICAL,  # a task's error is re-raised here
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SchedulerError(
            f"--dask {address}: cannot connect to a Dask scheduler ({reason}); expected the "
            "address of a running scheduler, e.g. tcp://host:8786"
        ) from None
    with client:
        yield client


def partitions(path: pathlib.Path, tree: str, entries: int, size: int) -> list[Partition]:
    """The entries of ``tree`` in ``path`` as ``ceil(entries / size)`` ranges whose lengths
    differ by at most one (one empty range for an empty tree, so that its branches are still
    checked)."""
    return split_entries(path, tree, entries, max(1, -(-entries // size)))


def hard_histograms_dask(
    config: Config,
    client: Client,
    *,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> dict[TemplateKey, Histogram]:
    """:func:`analysis.histograms.hard_histograms` of ``config``, computed on the workers of
    ``client`` per partition and summed by the scheduler (module docstring)."""
    if config.general.input_type == "histogram":
        return hard_histograms(config, device=device)
    (result,) = cut_set_sums(
        [config], client, partition_size=partition_size, cache_dir=cache_dir, device=device
    )
    return result.histograms


def cut_flows_dask(
    configs: Sequence[Config],
    client: Client,
    *,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[tuple[dict[str, CutFlow], dict[str, Any]]]:
    """Per configuration of ``configs`` (one analysis at several cut values): its
    :func:`analysis.cutflow.cut_flow` and :func:`analysis.cutflow.mc_statistics_summary`, from
    the nominal templates of ``configs[0]`` read once per partition on the workers of
    ``client`` and summed by the scheduler."""
    templates = [t for t in configs[0].templates() if t.variation == "nominal"]
    sums = cut_set_sums(
        configs,
        client,
        templates,
        flows=True,
        partition_size=partition_size,
        cache_dir=cache_dir,
    )
    out = []
    for config, summed in zip(configs, sums, strict=True):
        background = {k: summed.histograms[k] for k in mc_statistics.background_templates(config)}
        out.append(
            (
                cut_flow(config, sums=summed.flows),
                mc_statistics.summary(config, background, config.optimization.min_effective_events),
            )
        )
    return out


def cut_set_sums(
    configs: Sequence[Config],
    client: Client,
    templates: Sequence[Template] | None = None,
    *,
    flows: bool = False,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> list[CutSetSums]:
    """Hard histograms (and with ``flows`` the cut-flow sums) of ``templates`` (default: all of
    ``configs[0]``) at the cut values of each of ``configs`` (one analysis at several cut
    values: the events are read once per partition), summed over partitions on the workers of
    ``client``. The histograms are float64 tensors on ``device``, in the order
    :func:`analysis.io.read_events` returns the templates."""
    from analysis.io import _groups, _where  # the single-process grouping and its names

    config = configs[0]
    templates = list(config.templates() if templates is None else templates)
    groups = _groups(templates)
    trees = list(dict.fromkeys((path, tree) for paths, tree in groups for path in paths))
    examples = {
        (path, tree): members[0]
        for (paths, tree), members in reversed(groups.items())
        for path in paths
    }
    counted = _gather(
        client,
        client.map(
            tree_entries,
            [config] * len(trees),
            [path for path, _ in trees],
            [examples[t] for t in trees],
            pure=False,
        ),
    )
    parts = [
        part
        for (path, tree), entries in zip(trees, counted, strict=True)
        for part in partitions(path, tree, entries, partition_size)
    ]
    futures = [
        client.submit(
            _partition_sums,
            list(configs),
            [t for t in templates if t.tree == part.tree and part.path in t.paths],
            part,
            None if cache_dir is None else str(cache_dir),
            flows,
            pure=False,
        )
        for part in parts
    ]
    leaves = futures
    while len(futures) > 1:
        futures = [
            client.submit(_add_all, *futures[i : i + FAN_IN], pure=False)
            for i in range(0, len(futures), FAN_IN)
        ]
    try:
        total = _gather(client, futures[0])
    except AnalysisError:
        _raise_first_error(leaves)
        raise
    for (paths, tree), members in groups.items():
        for template in members:
            if total["events"].get(template_key(template), 0) == 0:
                raise DataError(
                    f"{_where(paths, tree)}: {template.label} has no events after Filter "
                    f"{template.filter!r}"
                )
    regions = {region.name: region for region in config.regions}
    order = [template_key(t) for members in groups.values() for t in members]
    out = []
    for histograms, flow_sums in zip(total["histograms"], total["flows"], strict=True):
        out.append(
            CutSetSums(
                histograms={
                    key: Histogram(
                        edges=torch.tensor(
                            regions[key[0]].binning, dtype=torch.float64, device=device
                        ),
                        yields=torch.as_tensor(histograms[key][0]).to(device),
                        sumw2=torch.as_tensor(histograms[key][1]).to(device),
                    )
                    for key in dict.fromkeys(order)
                },
                flows={
                    key: (n.tolist(), sumw.tolist(), sumw2.tolist())
                    for key, (n, sumw, sumw2) in flow_sums.items()
                },
            )
        )
    return out


def _raise_first_error(leaves: Sequence[Any]) -> None:
    """Raise the error of the first failed partition task in ``leaves`` (their order follows
    the single-process reader's files and trees), so that the message is the one the
    single-process run gives, whichever task failed first in time."""
    from distributed import wait

    wait(leaves)
    for leaf in leaves:
        if leaf.status == "error":
            error = leaf.exception()
            if isinstance(error, AnalysisError):  # else (a lost worker): the caller's error
                raise error
            return


def _gather(client: Client, futures: Any) -> Any:
    """``client.gather(futures)``; a worker lost while computing (killed for memory, its
    node gone; dask retries a task on ``distributed.scheduler.allowed-failures`` workers first)
    is a :class:`SchedulerError`."""
    from distributed import KilledWorker

    try:
        return client.gather(futures)
    except KilledWorker as err:
        raise SchedulerError(
            f"Dask workers died while computing ({str(err).strip().splitlines()[0]}); "
            "give the workers more memory or use a smaller --dask-partition-size"
        ) from None


# ----------------------------------------------------------------------------- worker tasks
def _partition_sums(
    configs: list[Config],
    templates: list[Template],
    partition: Partition,
    cache_dir: str | None,
    flows: bool,
) -> dict[str, Any]:
    """One partition's event counts per template, and per cut set its hard histograms
    ``{key: (yields, sumw2)}`` and (with ``flows``) cut-flow sums ``{key: (n, sumw, sumw2)}``,
    all float64 numpy arrays."""
    events = read_events(
        configs[0], templates, cache_dir=cache_dir, progress=False, partition=partition
    )
    histograms = [
        {
            key: (h.yields.numpy(), h.variances.numpy())
            for key, h in hard_histograms(config, events).items()
        }
        for config in configs
    ]
    flow_sums = [
        {
            key: tuple(np.asarray(s, np.float64) for s in sums)
            for key, sums in cut_flow_sums(config, events).items()
        }
        if flows
        else {}
        for config in configs
    ]
    return {
        "events": {key: len(ev) for key, ev in events.items()},
        "histograms": histograms,
        "flows": flow_sums,
    }


def _add_all(*parts: Any) -> Any:
    """The sum of partial results, left to right (a reduction task)."""
    total = parts[0]
    for part in parts[1:]:
        total = _add(total, part)
    return total


def _add(a: Any, b: Any) -> Any:
    """Elementwise sum of two nested partial results (dicts by key, a key missing on one side
    taken from the other; lists and tuples by position; numbers and arrays added)."""
    if isinstance(a, dict):
        return {
            k: _add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
            for k in dict.fromkeys([*a, *b])
        }
    if isinstance(a, list | tuple):
        return type(a)(_add(x, y) for x, y in zip(a, b, strict=True))
    return a + b
