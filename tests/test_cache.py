"""The column cache: keyed on file content, verified on load, best effort on write."""

from __future__ import annotations

import copy
import errno
import hashlib
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest
import uproot
import xxhash

from analysis import config as configuration
from analysis.cache import file_digest
from analysis.errors import AnalysisError
from analysis.io import read_events

N_EVENTS = 4000
CUT = 0.2  # the region's Filter: x > CUT


def _write(path: pathlib.Path, x: np.ndarray, w: np.ndarray | None = None) -> None:
    """A flat, uncompressed TTree 'events': same event count and types give the same size."""
    columns = {"x": x} if w is None else {"x": x, "w": w}
    with uproot.recreate(path, compression=None) as file:
        tree = file.mktree("events", {k: v.dtype for k, v in columns.items()})
        tree.extend(columns)


class _Inputs:
    """data.root (x) and mc.root (x, w) in ``folder``, a config reading them, and a checker."""

    def __init__(self, folder: pathlib.Path, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.data_x = rng.uniform(0.0, 2.0, N_EVENTS)
        self.mc_x = rng.uniform(0.0, 2.0, N_EVENTS)
        self.mc_w = rng.uniform(0.5, 1.5, N_EVENTS)
        folder.mkdir(parents=True)
        _write(folder / "data.root", self.data_x)
        _write(folder / "mc.root", self.mc_x, self.mc_w)
        self.relocate(folder)

    def relocate(self, folder: pathlib.Path) -> None:
        """Read the files from ``folder`` from now on."""
        self.folder = folder
        self.config = configuration.from_dict(
            {
                "General": {
                    "Measurement": "c",
                    "POI": "mu",
                    "InputPath": f"{folder}/{{SamplePath}}",
                },
                "Regions": [
                    {"Name": "SR", "Variable": "x", "Binning": [0, 1, 2], "Filter": f"x > {CUT}"}
                ],
                "Samples": [
                    {"Name": "Data", "Tree": "events", "SamplePath": "data.root", "Data": True},
                    {"Name": "Sim", "Tree": "events", "SamplePath": "mc.root", "Weight": "w"},
                ],
                "NormFactors": [{"Name": "mu", "Samples": "Sim", "Nominal": 1, "Bounds": [0, 10]}],
            }
        )

    def read_and_check(self, cache_dir: pathlib.Path | None) -> None:
        """read_events, and compare every column with the arrays written to the files."""
        events = read_events(self.config, cache_dir=cache_dir, progress=False)
        data, mc = events[("SR", "Data", "nominal")], events[("SR", "Sim", "nominal")]
        np.testing.assert_array_equal(data.observable.numpy(), self.data_x[self.data_x > CUT])
        np.testing.assert_array_equal(data.weight.numpy(), np.ones(np.sum(self.data_x > CUT)))
        np.testing.assert_array_equal(mc.observable.numpy(), self.mc_x[self.mc_x > CUT])
        np.testing.assert_array_equal(mc.weight.numpy(), self.mc_w[self.mc_x > CUT])


def _cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "analysis.cache" and r.levelno >= logging.WARNING
    ]


def _hits(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("cache hit") for r in caplog.records)


def _entry_matches_its_name(path: pathlib.Path) -> bool:
    """An entry's name is the hash of the key payload stored in it."""
    with np.load(path, allow_pickle=False) as stored:
        payload = str(stored["key"][()])
    return hashlib.sha256(payload.encode()).hexdigest()[:32] == path.stem


def test_file_digest_is_xxh3_128_of_all_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    content = np.random.default_rng(0).bytes((1 << 22) + 123)  # more than one read chunk
    path.write_bytes(content)
    assert file_digest(path) == xxhash.xxh3_128(content).hexdigest()


def test_same_size_rewrite_with_restored_mtime_is_read_again(tmp_path):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"
    inputs.read_and_check(cache)
    path = inputs.folder / "data.root"
    before = path.stat()
    inputs.data_x = inputs.data_x[::-1] + 0.25  # other values, same count and type
    _write(path, inputs.data_x)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    inputs.read_and_check(cache)  # the new values
    assert len(list(cache.glob("*.npz"))) == 3  # data before, data after, mc


def test_hit_opens_no_root_file_and_same_bytes_elsewhere_share_the_entry(
    tmp_path, monkeypatch, caplog
):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"
    inputs.read_and_check(cache)
    entries = sorted(cache.glob("*.npz"))
    assert len(entries) == 2 and all(_entry_matches_its_name(p) for p in entries)
    moved = copy.copy(inputs)
    shutil.copytree(inputs.folder, tmp_path / "copy")
    moved.relocate(tmp_path / "copy")
    caplog.set_level(logging.DEBUG, logger="analysis")
    with monkeypatch.context() as patch:
        patch.setattr(uproot, "open", lambda *a, **k: pytest.fail("ROOT file opened on a hit"))
        inputs.read_and_check(cache)
        moved.read_and_check(cache)
    assert _hits(caplog) == 4
    assert sorted(cache.glob("*.npz")) == entries


def test_swapped_entries_are_detected_recomputed_and_rewritten(tmp_path, caplog):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"
    inputs.read_and_check(cache)
    first, second = sorted(cache.glob("*.npz"))
    first.rename(cache / "swap")
    second.rename(first)
    (cache / "swap").rename(second)
    assert not _entry_matches_its_name(first) and not _entry_matches_its_name(second)
    caplog.set_level(logging.DEBUG, logger="analysis")
    inputs.read_and_check(cache)
    assert _hits(caplog) == 0
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 2 and all("written for other inputs" in w for w in warnings)
    assert sorted(cache.glob("*.npz")) == [first, second]
    assert _entry_matches_its_name(first) and _entry_matches_its_name(second)
    caplog.clear()
    inputs.read_and_check(cache)
    assert _hits(caplog) == 2


def test_corrupt_entry_is_ignored_and_rewritten(tmp_path, caplog):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"
    inputs.read_and_check(cache)
    entry = sorted(cache.glob("*.npz"))[0]
    entry.write_bytes(entry.read_bytes()[:100])
    inputs.read_and_check(cache)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and f"ignoring unreadable cache entry {entry}" in warnings[0]
    assert _entry_matches_its_name(entry)


@pytest.mark.parametrize("where", ["cache is a file", "parent is a file"])
def test_unwritable_cache_warns_once_per_call_and_results_are_right(tmp_path, caplog, where):
    inputs = _Inputs(tmp_path / "in")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    cache = blocker if where == "cache is a file" else blocker / "cache"
    for _ in range(2):  # once per read_events call, not once per process
        caplog.clear()
        inputs.read_and_check(cache)
        warnings = _cache_warnings(caplog)
        assert len(warnings) == 1, warnings  # two trees, one warning
        assert f"cannot write the column cache in {cache}" in warnings[0]
        assert "File exists" in warnings[0] or "Not a directory" in warnings[0]
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_warns(tmp_path, caplog):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        inputs.read_and_check(cache)
    finally:
        cache.chmod(0o755)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and "Permission denied" in warnings[0]
    assert list(cache.iterdir()) == []


def test_full_disk_warns_and_leaves_no_temporary_file(tmp_path, monkeypatch, caplog):
    inputs = _Inputs(tmp_path / "in")
    cache = tmp_path / "cache"

    def full_disk(handle, *args, **kwargs):  # the OS refuses the write half-way
        handle.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", full_disk)
        inputs.read_and_check(cache)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1
    assert f"cannot write the column cache in {cache}" in warnings[0]
    assert os.strerror(errno.ENOSPC) in warnings[0]
    assert list(cache.iterdir()) == []
    inputs.read_and_check(cache)  # space again: the entries are written
    assert len(list(cache.glob("*.npz"))) == 2 and len(list(cache.iterdir())) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_input_is_reported_by_reading_not_by_the_cache(tmp_path):
    inputs = _Inputs(tmp_path / "in")
    path = inputs.folder / "data.root"
    path.chmod(0o000)
    try:
        with pytest.raises(AnalysisError, match="data.root"):
            read_events(inputs.config, cache_dir=tmp_path / "cache", progress=False)
    finally:
        path.chmod(0o644)
