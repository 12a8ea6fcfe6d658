"""The ``diffana`` command line (contract in DESIGN.md), in the shape of pyhf's ``cli``.

Every command takes ``--output FILE`` (JSON; stdout when absent), ``--device auto|cpu|cuda[:N]``
and ``-v/--verbose``. Exit codes: 0 success, 2 user error (one line on stderr naming the file,
field or branch; no traceback), 1 internal error. Outputs are written atomically.

The commands are thin: they parse options, call the library and write its records as JSON.

- :mod:`~analysis.cli._common`: error handling, shared options, logging, JSON output;
- :mod:`~analysis.cli.pipeline`: ``generate``, ``validate``, ``histograms``, ``workspace``,
  ``cutflow``, ``optimize``, ``scan-cuts``, ``report``;
- :mod:`~analysis.cli.stats`: ``fit``, ``hypotest``, ``significance``, ``limit``, ``scan``,
  ``ranking``;
- :mod:`~analysis.cli.plot`: the ``plot`` group.

``diffana --help`` imports none of torch, numpy or the analysis stages: each command imports
what it needs when it runs (``benchmarks/bench_startup.py`` measures it). A run as a program
(the console script, ``python -m analysis.cli``) ends with ``os._exit`` once its outputs are
flushed (:class:`_Program`): the interpreter's teardown after torch costs 0.5 s and writes
nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, NoReturn

import click

from analysis.cli import pipeline, plot, stats
from analysis.cli._common import _Group

__all__ = ["main"]


class _Program(_Group):
    """The ``diffana`` group; called as a program (``main()``, as the console script and
    ``python -m analysis.cli`` do), it ends the process with :func:`os._exit`.

    The exit code is click's (0, 2 for user errors and usage errors, 1 for an abort), taken
    from its ``SystemExit``; before exiting, what the interpreter's shutdown does that matters
    is done: non-daemon threads are joined, the ``atexit`` handlers run (temporary folders,
    worker processes, log handlers), stdout and stderr are flushed. Every output file is
    complete by then (written atomically and closed). What is skipped is the interpreter's
    teardown of its modules and objects: 0.5 s after importing torch, for nothing. A flush
    that fails (a closed pipe) exits 120, as the interpreter does. An exception other than
    ``SystemExit`` (an internal error) takes the normal path: a traceback and exit code 1.
    ``main.main(...)`` (``CliRunner``, in-process callers) returns or raises as click does.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        try:
            self.main(*args, **kwargs)
            code: Any = 0
        except SystemExit as exit_:
            code = exit_.code
        if code is None:
            code = 0
        elif not isinstance(code, int):  # SystemExit("message"): printed, exit code 1
            print(code, file=sys.stderr)
            code = 1
        for thread in threading.enumerate():  # as the interpreter's own shutdown does
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 120
        os._exit(code)


@click.group(cls=_Program, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffana")
def main() -> None:
    """diffana: a differentiable statistical-analysis pipeline for HEP on PyTorch."""


for _command in (
    pipeline.generate,
    pipeline.validate,
    pipeline.histograms,
    pipeline.workspace,
    stats.fit,
    stats.hypotest,
    stats.significance,
    stats.limit,
    stats.scan,
    stats.ranking,
    pipeline.cutflow,
    pipeline.optimize,
    pipeline.scan_cuts,
    plot.plot,
    pipeline.report,
):
    main.add_command(_command)
del _command
