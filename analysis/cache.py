"""Content identity of input files, and the on-disk column cache keyed on it.

:func:`analysis.io.read_events` stores the columns it computed for one (files, tree) in one
``.npz`` entry of the cache folder (:func:`default_cache_dir`, or the ``cache_dir`` argument).

**Key.** An entry is named by a hash of the *key payload*: canonical JSON text holding
:data:`CACHE_VERSION`, the content digest of each input file in order (:func:`file_digest`,
XXH3-128 over the whole file), the tree name, and per request the Definitions it uses (name,
expression, in evaluation order: a sample's own Definitions included, so two samples that read
one tree with different Definitions get different columns) and its Filter, Weight and
expressions. A file is identified by its bytes, never by its path,
size or modification time: a file rewritten in place with the same size and a restored mtime gets
a new digest, hence a new entry; the same bytes under another path share the entry.

**Verification.** Each entry stores its full key payload. On load the stored payload must equal
the expected one, character for character; otherwise (two entries swapped by renaming, a copied
or truncated entry, an entry from another version) the entry is ignored with a warning, the
columns are recomputed from the ROOT files and the entry is overwritten.

**Best effort.** The cache never changes a result and never stops a read. An entry that cannot
be read is ignored and recomputed. When an entry cannot be written (the cache folder is a regular
file or lies under one, has no write permission, the disk is full: any ``OSError``), the columns
are still returned and one warning per :class:`ColumnCache` (one per ``read_events`` call) names
the folder and the reason. Entries are written atomically (:func:`analysis.files.write_atomically`),
so a failed write leaves no partial entry and no temporary file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from analysis.files import write_atomically

log = logging.getLogger(__name__)

#: bump when the cache layout or the meaning of cached arrays changes
CACHE_VERSION = 3  # 3: Definitions per request (per-sample Definitions), Filter first

_CHUNK = 1 << 22
_KEY_FIELD = "key"

#: per request: (columns by expression, weight), in request order
Columns = list[tuple[dict[str, np.ndarray], np.ndarray]]


def file_digest(path: str | os.PathLike[str]) -> str:
    """The XXH3-128 hex digest of the whole content of the file at ``path``.

    XXH3 (xxhash, already required by uproot) hashes at 5.6 to 7.4 GB/s here, 11 to 13 times
    BLAKE2b (0.5 to 0.6 GB/s): 15-17% of a cached read of the demo at 1e6 and 1e7 events, 1-2%
    of an uncached one (``benchmarks/bench_cache.py``). It is not a cryptographic hash: it
    identifies a file's content against accidental change (a file rewritten in place), not
    against an adversary who crafts a collision with a file already in this user's own cache.
    """
    digest = xxhash.xxh3_128()
    with pathlib.Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> pathlib.Path:
    """``$DIFFANA_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffana``, else ``~/.cache/diffana``."""
    if "DIFFANA_CACHE_DIR" in os.environ:
        return pathlib.Path(os.environ["DIFFANA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "diffana"


@dataclass(frozen=True)
class CacheKey:
    """The key of one cache entry: the canonical JSON payload and the expressions it lists."""

    payload: str
    expressions: tuple[tuple[str, ...], ...]

    @property
    def name(self) -> str:
        """The entry's file name: ``<first 32 hex digits of SHA-256(payload)>.npz``."""
        return hashlib.sha256(self.payload.encode()).hexdigest()[:32] + ".npz"


class ColumnCache:
    """The column cache as one ``read_events`` call sees it.

    ``directory`` None disables caching (nothing is hashed, read or written). The object lives
    for one call: it remembers the digests of the files it has hashed (a file holding several
    trees is read once per call) and whether it has already warned about a failed write.
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = None if directory is None else pathlib.Path(directory)
        self._digests: dict[pathlib.Path, str] = {}
        self._warned = False

    def key(
        self,
        paths: Sequence[pathlib.Path],
        tree: str,
        requests: Iterable[tuple[Sequence[tuple[str, str]], str | None, str | None, Sequence[str]]],
    ) -> CacheKey | None:
        """The key of the columns of ``tree`` in ``paths``; None when caching is disabled or a
        file cannot be read (reading it then reports the problem).

        ``requests``: per request, in the order of the columns to be stored, the (name,
        expression) of the Definitions it uses, its Filter, Weight and expressions.
        """
        if self.directory is None:
            return None
        try:
            digests = [self._digest(path) for path in paths]
        except OSError as err:  # unreadable input: no caching; reading it reports the error
            log.debug("not caching %s: cannot hash an input file (%s)", list(paths), err)
            return None
        listed = [(list(map(list, d)), f, w, tuple(exprs)) for d, f, w, exprs in requests]
        payload = {
            "version": CACHE_VERSION,
            "files": digests,
            "tree": tree,
            "requests": [[d, f, w, list(exprs)] for d, f, w, exprs in listed],
        }
        return CacheKey(
            payload=json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False),
            expressions=tuple(exprs for _, _, _, exprs in listed),
        )

    def load(self, key: CacheKey | None) -> Columns | None:
        """The stored columns for ``key``, or None (disabled, absent, unreadable, mismatched)."""
        if key is None or self.directory is None:
            return None
        path = self.directory / key.name
        if not path.is_file():
            return None
        try:
            # our own handle: np.load leaks the one it opens when the zip is damaged
            with path.open("rb") as handle, np.load(handle, allow_pickle=False) as stored:
                if str(stored[_KEY_FIELD][()]) != key.payload:
                    log.warning(
                        "ignoring cache entry %s: it was written for other inputs; "
                        "recomputing and overwriting it",
                        path,
                    )
                    return None
                return [
                    (
                        {e: stored[f"r{i}_c{j}"] for j, e in enumerate(exprs)},
                        stored[f"r{i}_weight"],
                    )
                    for i, exprs in enumerate(key.expressions)
                ]
        except Exception as err:  # a damaged entry is ignored and rewritten
            log.warning(
                "ignoring unreadable cache entry %s (%s: %s)", path, type(err).__name__, err
            )
            return None

    def store(self, key: CacheKey | None, columns: Columns) -> None:
        """Write ``columns`` under ``key``, best effort: a failure is logged, never raised."""
        if key is None or self.directory is None:
            return
        arrays: dict[str, Any] = {_KEY_FIELD: np.array(key.payload)}
        for i, (values, weight) in enumerate(columns):
            arrays[f"r{i}_weight"] = weight
            for j, column in enumerate(values.values()):
                arrays[f"r{i}_c{j}"] = column
        path = self.directory / key.name
        try:
            write_atomically(path, lambda handle: np.savez(handle, **arrays))
        except OSError as err:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot write the column cache in %s (%s); results are not cached",
                    self.directory,
                    err,
                )
            else:
                log.debug("cannot write cache entry %s (%s)", path, err)
        else:
            log.debug("cache entry %s written", path)

    def _digest(self, path: pathlib.Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]
