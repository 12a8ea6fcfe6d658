"""Atomic file writes: every output of diffana appears whole or not at all.

The content goes to a temporary file in the target's folder (created if missing), which then
replaces the target in one ``os.replace``: readers see the old file or the new one, never a
partial one, and a failed write leaves no temporary file behind (DESIGN.md, CLI contract).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
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


def json_text(payload: Any, *, indent: int | None = 2) -> str:
    """``payload`` as strict JSON text (RFC 8259: no NaN or Infinity), ending in a newline.

    A non-finite number becomes ``null``, and the mapping that holds it (directly, or in a list
    under key ``k``) gains ``"k_reason"`` saying what it was (``"nan"``, ``"+inf"``, ``"-inf"``,
    or for a list the positions and values), so a reader can tell "not computed" from "no value".
    """
    return json.dumps(_finite(payload), indent=indent, allow_nan=False) + "\n"


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out[key] = _finite(item)
            reason = _reason(item)
            if reason is not None and f"{key}_reason" not in value:
                out[f"{key}_reason"] = reason
        return out
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _reason(value: Any) -> str | None:
    """What was not finite in ``value`` (a number, or a flat list of numbers), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"not finite ({_nonfinite_name(value)})"
    if isinstance(value, list | tuple):
        bad = [
            f"[{i}] {_nonfinite_name(v)}"
            for i, v in enumerate(value)
            if isinstance(v, float) and not math.isfinite(v)
        ]
        if bad:
            return "not finite at " + ", ".join(bad)
    return None
