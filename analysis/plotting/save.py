"""Writing figures to disk atomically."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Sequence

from matplotlib.figure import Figure


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
    created. Each file is written to a temporary file in the same folder and moved into place
    with :func:`os.replace`, so a reader (a workflow, a report) never sees half a file and an
    interrupted save leaves the previous file intact.
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
    written = []
    for target, fmt in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as handle:
                figure.savefig(handle, format=fmt, dpi=dpi)
            os.chmod(temporary, 0o644)  # mkstemp makes the file private (0600)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        written.append(target)
    return written
