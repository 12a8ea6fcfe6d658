"""Atomic file writes: every output of diffana appears whole or not at all.

The content goes to a temporary file in the target's folder (created if missing), which then
replaces the target in one ``os.replace``: readers see the old file or the new one, never a
partial one, and a failed write leaves no temporary file behind (DESIGN.md, CLI contract).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO, Any


def write_atomically(
    path: str | os.PathLike[str], content: str | bytes | Callable[[IO[Any]], Any]
) -> pathlib.Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content``: text (written as UTF-8), bytes, or a function that writes to the binary file
    handle it is given (``figure.savefig``, ``np.savez``, ``torch.save``). The file gets mode
    0644 (``mkstemp`` makes it private).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
