"""Progress bars (tqdm) for the long stages: reading, optimization, toys.

A bar is shown only when asked for and when stderr is a terminal, so logs, pipes, Snakemake
jobs and notebooks (whose live plots are their progress) get no control characters. In a
Jupyter kernel ``tqdm.auto`` would pick the widget bar and warn without ipywidgets; it is
imported only for a terminal.
"""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(
    total: int, description: str, *, enabled: bool = True, initial: int = 0, unit: str = "it"
) -> Any:
    """A ``tqdm`` bar of ``total`` steps (``initial`` done), disabled unless ``enabled`` and
    stderr is a terminal; use ``update``/``set_postfix`` and ``close`` as with tqdm."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

        enabled = False
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=description,
        unit=unit,
        leave=False,
        file=sys.stderr,
    )
