"""Writing figures to disk atomically."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import IO, Any

from matplotlib.figure import Figure

from analysis.files import write_atomically


def save_figure(
    figure: Figure,
    path: str | os.PathLike[str],
    formats: Sequence[str] = ("png", "pdf"),
    *,
    dpi: float = 150,
) -> list[pathlib.Path]:
    """Write ``figure`` once per format and return the paths written.

    ``path`` is either a stem (``plots/fit/pulls``: writes ``pulls.png`` and ``pulls.pdf``
    for the default ``formats``) or a file name whose suffix is a format matplotlib writes
    (``plots/pulls.svg``: writes only that file, ``formats`` is ignored). Missing folders are
    created. Each file is written by :func:`analysis.files.write_atomically`, so a reader (a
    workflow, a report) never sees half a file and an interrupted save leaves the previous file
    intact.
    """
    path = pathlib.Path(path)
    supported = figure.canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix in supported:
        targets = [(path, suffix)]
    else:
        unknown = [f for f in formats if f.lower().lstrip(".") not in supported]
        if unknown:
            raise ValueError(
                f"unsupported figure format(s) {', '.join(unknown)}; matplotlib writes "
                f"{', '.join(sorted(supported))}"
            )
        targets = []
        for fmt in formats:
            fmt = fmt.lower().lstrip(".")
            targets.append((path.with_name(f"{path.name}.{fmt}"), fmt))
    for target, fmt in targets:

        def write(handle: IO[Any], f: str = fmt) -> None:
            figure.savefig(handle, format=f, dpi=dpi)

        write_atomically(target, write)
    return [target for target, _ in targets]
