"""Atomic writes and output faults: every operating-system fault while writing is one
OutputError line naming the target and the reason, and leaves no temporary file behind."""

from __future__ import annotations

import errno
import os
import pathlib
import tempfile

import pytest
from click.testing import CliRunner

from analysis.cli import main
from analysis.errors import AnalysisError, InputFileError, OutputError
from analysis.files import expand_paths, write_atomically
from tests.conftest import MODELS


def _read_only_stops_writes() -> bool:
    """Whether this process is refused a file in a folder of mode 0555: not as root (euid 0
    with CAP_DAC_OVERRIDE), where such cases are skipped."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            pathlib.Path(folder, "probe").touch()
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o755)
    return False


AS_ROOT = not _read_only_stops_writes()
"""Root writes into folders without write permission: such cases are skipped for root."""


def leftovers(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.rglob(".*.tmp"))


def test_write_atomically_replaces_whole(tmp_path):
    target = tmp_path / "new" / "x.json"
    assert write_atomically(target, "{}\n") == target
    write_atomically(target, b"[]\n")
    write_atomically(target, lambda handle: handle.write(b"1\n"))
    assert target.read_text() == "1\n"
    assert (target.stat().st_mode & 0o777) == 0o644
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("where", "code", "reason"),
    [
        ("below_file", errno.ENOTDIR, "Not a directory: {tmp}/file"),
        ("deeper_below_file", errno.ENOTDIR, "Not a directory: {tmp}/file/sub"),
        ("directory_in_place", errno.EISDIR, "Is a directory"),
        pytest.param(
            "read_only_folder",
            errno.EACCES,
            "Permission denied",
            marks=pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders"),
        ),
    ],
)
def test_output_faults(tmp_path, where, code, reason):
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "x.json").mkdir()
    (tmp_path / "ro").mkdir()
    target = {
        "below_file": tmp_path / "file" / "x.json",
        "deeper_below_file": tmp_path / "file" / "sub" / "x.json",
        "directory_in_place": tmp_path / "x.json",
        "read_only_folder": tmp_path / "ro" / "x.json",
    }[where]
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(OutputError) as caught:
            write_atomically(target, "{}\n")
    finally:
        (tmp_path / "ro").chmod(0o755)
    err = caught.value
    assert isinstance(err, OSError) and isinstance(err, AnalysisError)
    assert err.errno == code
    assert str(err) == f"{target}: cannot write ({reason.format(tmp=tmp_path)})"
    assert leftovers(tmp_path) == []
    assert (tmp_path / "file").read_text() == "a regular file\n"


def test_full_disk_while_writing(tmp_path):
    """ENOSPC from the writer (``torch.save``, ``savefig``... write to the handle): the old file
    stays as it was and no temporary file is left."""
    target = tmp_path / "x.json"
    target.write_text("old\n")

    def fill(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as caught:
        write_atomically(target, fill)
    assert str(caught.value) == f"{target}: cannot write (No space left on device)"
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_fault_at_rename(tmp_path, monkeypatch, code):
    """The fault injected at the operating-system boundary (``os.replace``)."""
    target = tmp_path / "x.json"

    def replace(src, dst):
        raise OSError(code, os.strerror(code), src, None, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=r"x\.json: cannot write \(") as caught:
        write_atomically(target, "{}\n")
    assert str(caught.value) == f"{target}: cannot write ({os.strerror(code)})"
    assert not target.exists() and leftovers(tmp_path) == []


def test_analysis_error_from_the_writer_passes_unchanged(tmp_path):
    def fail(handle):
        raise InputFileError("in.root: not found")

    with pytest.raises(InputFileError, match="^in.root: not found$"):
        write_atomically(tmp_path / "x.json", fail)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- CLI
def one_error_line(run) -> str:
    assert run.exit_code == 2, run.output
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr
    assert "Traceback" not in run.output
    return lines[0]


def test_cli_output_below_a_file(tmp_path):
    """``--output`` below a regular file (fails for root too): exit 2, one line, nothing
    written; the same for ``generate --out``, whose ROOT files are not written by
    ``write_atomically`` (the CLI's handler of operating-system faults)."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "v.json"
    run = CliRunner().invoke(
        main, ["validate", str(MODELS / "dimuon.yaml"), "--output", str(target)]
    )
    line = one_error_line(run)
    assert line == f"Error: {target}: cannot write (Not a directory: {tmp_path / 'file'})"

    run = CliRunner().invoke(main, ["generate", "--out", str(tmp_path / "file" / "gen")])
    assert one_error_line(run) == f"Error: {tmp_path / 'file' / 'gen'}: Not a directory"
    assert leftovers(tmp_path) == [] and (tmp_path / "file").read_text() == ""


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")
def test_cli_generate_into_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        run = CliRunner().invoke(main, ["generate", "--out", str(folder), "--events", "50"])
    finally:
        folder.chmod(0o755)
    assert "Permission denied" in one_error_line(run)
    assert list(folder.iterdir()) == []


def test_json_text_is_strict_and_says_what_was_not_finite():
    """NaN and infinities become null with a "<key>_reason"; the text parses as strict JSON
    (Python's reader would otherwise accept NaN and Infinity tokens)."""
    import json
    import math

    from analysis.files import json_text

    def refuse(token):
        raise ValueError(token)

    text = json_text(
        {"z": math.inf, "band": [1.0, math.nan, -math.inf], "inner": {"p": 0.5}, "n": 3}
    )
    out = json.loads(text, parse_constant=refuse)
    assert out == {
        "z": None,
        "z_reason": "not finite (+inf)",
        "band": [1.0, None, None],
        "band_reason": "not finite at [1] nan, [2] -inf",
        "inner": {"p": 0.5},
        "n": 3,
    }


def test_expand_paths_lists_the_sorted_matches(tmp_path):
    """Wildcards (``*``, ``?``, ``[...]``, ``**``) become the regular files they match, sorted
    by name whatever the order of creation; plain paths and the order of the list stay; a
    pattern without a match is kept for the reader to report; a folder is not a match."""
    for name in ("b_2.root", "b_10.root", "a_1.root", "b_1.root", "sub/b_3.root", "b_x.root/"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if name.endswith("/") else path.write_bytes(b"")
    got = expand_paths(
        [
            tmp_path / "b_*.root",
            str(tmp_path / "a_1.root"),
            tmp_path / "b_?.root",
            tmp_path / "**" / "b_[3]*",
            tmp_path / "none_*.root",
            tmp_path / "missing.root",
        ]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "b_1.root",
        "b_10.root",
        "b_2.root",
        "a_1.root",
        "b_1.root",
        "b_2.root",
        "sub/b_3.root",
        "none_*.root",
        "missing.root",
    ]
