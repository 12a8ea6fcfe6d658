"""What every ``diffana`` command shares: the error handling of the ``main`` group (user errors
as one line and exit code 2), the common options (``--output``, ``--device``, ``--threads``,
``-v``; ``CONFIG`` and its cache settings), logging set-up, JSON output, and reading an INPUT
(JSON workspace, HistFactory XML or analysis YAML).

Start-up time: nothing here imports torch or another heavy module at import time
(:class:`_LazyModule`); each command imports what it needs when it runs.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import logging
import pathlib
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from analysis.errors import AnalysisError
from analysis.files import json_text, write_atomically

log = logging.getLogger("analysis")
"""The package's root logger: the CLI alone gives it a handler (:func:`_setup_logging`)."""


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


#: a random seed: what both numpy (``default_rng``, non-negative) and torch (``manual_seed``,
#: at most 64 bits) take; the configuration schema's ``Optimization.Seed`` has the same range
SEED = click.IntRange(0, 2**64 - 1)

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
"""``--threads``: applied by :func:`set_cpu_policy`."""


def set_cpu_policy(count: int) -> None:
    """The CLI's CPU policy: ``torch.set_num_threads(count)`` (0 keeps torch's default) and
    :func:`keep_freed_memory`.

    One thread by default: the tensors of a likelihood fit (hundreds of bins and parameters)
    are too small to share out: torch's default (one thread per core) made the fit of
    cabinetry's example workspace 1.7x slower on a loaded 2-core machine (up to 4x in other
    fits; ``benchmarks/bench_startup.py``). Only the CLI sets this process-wide state, never
    the library.
    """
    if count > 0:
        torch.set_num_threads(count)
    keep_freed_memory()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters

MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest ``M_MMAP_THRESHOLD`` on 64-bit
systems); the heap is never trimmed (``M_TRIM_THRESHOLD`` at its largest value)."""


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for the next allocation; True if it did.

    By default glibc serves a block above its threshold (128 KiB, raised to the largest block
    freed so far, up to 32 MiB) with its own ``mmap`` and returns it to the system when freed,
    and trims the top of the heap: a later block of that size is then new memory, and each of
    its 4 KiB pages is a page fault when first written (on this project's 2-core VM 1.5 us per
    page, against 0.6 us to write it). ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (its largest
    value), ``M_TRIM_THRESHOLD`` at its largest value and a 32 MiB ``M_TOP_PAD`` keep freed
    blocks in the heap for reuse. Measured on an optimization step of the demo at 1e6 events
    (about 30 MB of temporaries): 6,500 page faults per step by default, 4 with this setting
    once the heap has settled (after the first steps), and about 10% of the step's time. The
    price: the process keeps its peak memory until it exits. Process-wide, so only the CLI
    calls it (:func:`set_cpu_policy`), never the library; elsewhere than glibc (macOS, musl)
    it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # here: the statistics commands that need no torch do not load it

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, MMAP_THRESHOLD_BYTES),
        )
    )


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


class DeviceRequest(NamedTuple):
    """``--device`` and ``--threads`` as given, for a command that may finish without torch
    (a statistics command on the numpy backend) and resolves them only when it needs torch."""

    name: str
    threads: int

    def resolve(self) -> torch.device:
        """:func:`set_cpu_policy`, then :func:`resolve_device`."""
        set_cpu_policy(self.threads)
        return resolve_device(self.name)


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
    ``device`` (resolved by :func:`resolve_device`, after :func:`set_cpu_policy`) when the
    command's function takes one.

    A command without a ``device`` parameter computes nothing with torch (``validate``,
    ``generate``): it never imports torch, its ``--device`` is checked for its form only and
    ``--threads`` does nothing. A function marked ``defers_device`` gets a
    :class:`DeviceRequest` to resolve when (and if) it needs torch.
    """
    takes_device = "device" in inspect.signature(func).parameters
    defers_device = getattr(func, "defers_device", False)

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
        if takes_device and defers_device:
            kwargs["device"] = DeviceRequest(device, threads)
        elif takes_device:
            set_cpu_policy(threads)
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


class DaskRequest(NamedTuple):
    """``--dask [ADDRESS]``: the scheduler's ``address`` (None: a local cluster), the entries
    per partition and the seconds to wait for the scheduler (:mod:`analysis.dask_histograms`)."""

    address: str | None
    partition_size: int
    timeout: float


def dask_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--dask [ADDRESS]``, ``--dask-partition-size N`` and ``--dask-timeout SECONDS``;
    passes ``dask``, a :class:`DaskRequest` or None (one process)."""

    @click.option(
        "--dask",
        "dask_address",
        is_flag=False,
        flag_value="",
        default=None,
        metavar="[ADDRESS]",
        help="Read and fill the hard histograms on Dask: on a local cluster of 2 worker "
        "processes, or on the scheduler at ADDRESS (tcp://host:8786, e.g. of a dask-jobqueue "
        "cluster). Put it after CONFIG.",
    )
    @click.option(
        "--dask-partition-size",
        type=click.IntRange(min=1),
        default=500_000,
        show_default=True,
        metavar="N",
        help="With --dask: most entries of a file per task.",
    )
    @click.option(
        "--dask-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        metavar="SECONDS",
        help="With --dask ADDRESS: how long to wait for the scheduler before failing.",
    )
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        dask_address: str | None,
        dask_partition_size: int,
        dask_timeout: float,
        **kwargs: Any,
    ) -> Any:
        dask = None
        if dask_address is not None:
            dask = DaskRequest(dask_address or None, dask_partition_size, dask_timeout)
        return func(*args, dask=dask, **kwargs)

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


_json_file = click.Path(dir_okay=False, path_type=pathlib.Path)
"""A file argument or option (result JSON, analysis YAML, report HTML), not a folder."""
