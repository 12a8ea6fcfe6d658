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
what it needs when it runs (``benchmarks/bench_startup.py`` measures it).
"""

from __future__ import annotations

import click

from analysis.cli import pipeline, plot, stats
from analysis.cli._common import _Group

__all__ = ["main"]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
