"""``diffana optimize`` / ``scan-cuts`` options: ``--objective`` lists the registry's
objectives, and ``-o/--output FILE`` (every command's JSON) may not be ``--out DIR`` (the run's
folder) or a file the run writes there."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from analysis import objectives
from analysis.cli import main
from analysis.cli.pipeline import _objective_names


def test_objective_choices_are_the_registry():
    """The choices come from the config schema's enum (so ``--help`` imports no torch); they
    must be the registry's names, in its order."""
    assert _objective_names() == tuple(objectives.OBJECTIVES)
    help_text = CliRunner().invoke(main, ["optimize", "--help"]).output
    assert "[discovery_significance|cls|poi_uncertainty|upper_limit|asimov_significance]" in (
        help_text.replace("\n", "").replace(" ", "")
    )


@pytest.mark.parametrize(
    "command", [["optimize"], ["scan-cuts", "--method", "grid", "--budget", "2"]]
)
def test_bad_objective_and_conflicting_outputs_are_refused(toy, tmp_path, command):
    config = str(toy.write_config())
    out = tmp_path / "run"

    def run(*args):
        return CliRunner().invoke(
            main, [command[0], config, *command[1:], "--out", str(out), *args]
        )

    bad = run("--objective", "significance")
    assert bad.exit_code == 2
    assert "'significance' is not one of" in bad.output and "'discovery_significance'" in bad.output
    for output, needle in (
        (out, "is the --out folder"),
        (out / "cuts.json", "writes cuts.json in --out"),
        (out / "checkpoint.pt", "writes checkpoint.pt in --out"),
    ):
        result = run("--output", str(output))
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()  # refused before anything is written
