"""Files: atomic writes of every output, and the input files a path pattern names.

Every output of diffana appears whole or not at all.

The content goes to a temporary file in the target's folder (created if missing), which then
replaces the target in one ``os.replace``: readers see the old file or the new one, never a
partial one, and a failed write leaves no temporary file behind (DESIGN.md, CLI contract).
An operating-system fault while writing (read-only folder or file system, full disk or quota, a
path below a regular file, a directory in the target's place) is a user error,
:class:`analysis.errors.OutputError`, one line naming the target and the reason.

Input paths may hold wildcards (``ntuple_*.root``): :func:`expand_paths` lists the files they
match, sorted, as uproot and coffea expand a file-name pattern.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

from analysis.errors import AnalysisError, OutputError


def write_atomically(
    path: str | os.PathLike[str], content: str | bytes | Callable[[IO[Any]], Any]
) -> pathlib.Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content``: text (written as UTF-8), bytes, or a function that writes to the binary file
    handle it is given (``figure.savefig``, ``np.savez``, ``torch.save``). The file gets mode
    0644 (``mkstemp`` makes it private). The temporary file is ``.<name>.<random>.tmp`` beside
    the target; it is removed on any failure (a killed process can leave one behind).

    Raises :class:`~analysis.errors.OutputError` (an ``OSError``) with the message
    ``"<path>: cannot write (<reason>)"`` for any ``OSError`` on the way; an
    :class:`~analysis.errors.AnalysisError` raised by ``content`` passes unchanged.
    """
    path = pathlib.Path(path)
    tmp: str | None = None
    try:
        _make_folder(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, AnalysisError):
            temporary = str(path.parent / f".{path.name}.")
            raise OutputError.from_os_error(path, err, temporary=temporary) from err
        raise
    return path


def _make_folder(folder: pathlib.Path) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)``, but a regular file in its place is
    ENOTDIR ("Not a directory"), not mkdir's misleading "File exists"."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    folder.mkdir(parents=True, exist_ok=True)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~analysis.errors.OutputError` unless a file can be written at ``path``:
    its folder is created if missing, then a temporary file named as
    :func:`analysis.files.write_atomically` names its own (``.<name>.<random>.tmp``) is created,
    given one byte and removed. Messages: ``"<folder>: cannot create the folder (<reason>)"``,
    ``"<folder>: cannot write (<reason>)"``."""
    path = pathlib.Path(path)
    folder = path.parent
    try:
        _make_folder(folder)
    except OSError as err:
        raise OutputError.from_os_error(folder, err, "cannot create the folder") from err
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"\n")
    except OSError as err:
        temporary = str(folder / f".{path.name}.")
        raise OutputError.from_os_error(folder, err, temporary=temporary) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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


#: the characters that make a path a wildcard pattern (Python's :mod:`glob`, as uproot and
#: coffea expand them): ``*``, ``?``, ``[...]``; ``**`` matches folders recursively
WILDCARDS = frozenset("*?[")


def is_pattern(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a wildcard (:data:`WILDCARDS`)."""
    return any(char in WILDCARDS for char in str(path))


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[pathlib.Path, ...]:
    """The input files ``paths`` name, in order, each wildcard pattern replaced by the regular
    files it matches (:func:`glob.glob`, ``**`` recursive), sorted by name so that every run
    reads the same files in the same order (as uproot and coffea expand a file-name pattern;
    a file named twice is read twice, as there).

    A pattern that matches no file is kept as it is, for the reader to report
    (:func:`analysis.io.read_events`: ``"<pattern>: no file matches the wildcard pattern"``), so
    that listing the inputs of a configuration never touches more than the folder listings.
    """
    out: list[pathlib.Path] = []
    for path in paths:
        if is_pattern(path):
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
            out += [pathlib.Path(p) for p in matches] or [pathlib.Path(path)]
        else:
            out.append(pathlib.Path(path))
    return tuple(out)
