"""Content identity of input files, and the on-disk column cache keyed on it.

A file is identified by a digest of its bytes, never by its path, size or modification time:
a file rewritten in place with the same size and a restored mtime gets a new digest.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

_CHUNK = 1 << 22


def file_digest(path: str | os.PathLike[str]) -> str:
    """The BLAKE2b-128 hex digest of the whole content of the file at ``path``."""
    digest = hashlib.blake2b(digest_size=16)
    with pathlib.Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
