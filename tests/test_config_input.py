"""Configuration input that is refused before it can do harm: NaN and infinite numbers, booleans
as numbers, duplicate keys, alias bombs and names that are not safe file names.

Every case is a real file written in tmp_path and read by ``configuration.load`` (or the CLI);
the expected messages are spelled out by hand.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from analysis import config as configuration
from analysis.cli import main
from analysis.errors import ConfigError

#: a small valid analysis that has every kind of number the schema knows, each value unique in
#: the text so that a case can replace it (line numbers matter for the duplicate-key cases)
BASE = """\
General:
  Measurement: toy
  POI: mu
  InputPath: "data/{SamplePath}"
  YieldFloor: 1.0e-6
  Fixed:
    - {Name: Lumi, Value: 0.0}
Regions:
  - Name: SR
    Variable: x
    Binning: [0.0, 1.0, 2.0, 3.0]
    Cuts:
      - {Variable: met, Direction: "<", Value: 60.0, Bounds: [10.0, 200.0]}
      - {Name: lead, Variable: pt, Direction: ">", Value: 25.0, Bounds: [5.0, 90.0]}
Samples:
  - {Name: Data, Tree: data, SamplePath: data.root, Data: true}
  - {Name: Signal, Tree: sig, SamplePath: mc.root}
  - {Name: Background, Tree: bkg, SamplePath: mc.root}
Systematics:
  - Name: Lumi
    Type: Normalization
    Up: {Normalization: 0.02}
    Down: {Normalization: -0.03}
NormFactors:
  - {Name: mu, Samples: Signal, Nominal: 1.5, Bounds: [-5.0, 10.0]}
Optimization:
  Steps: 20
  LearningRate: 0.05
  Bandwidth: 0.36
  Temperature: {Initial: 0.5, Final: 0.02}
"""


def write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(old, new, text=BASE):
    assert text.count(old) == 1, old
    return text.replace(old, new)


def message_of(path):
    with pytest.raises(ConfigError) as info:
        configuration.load(path)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_base_is_valid(tmp_path):
    cfg = configuration.load(write(tmp_path, BASE, "base.yaml"))
    assert cfg.cut_values() == {"SR:met<": 60.0, "lead": 25.0}
    assert cfg.general.yield_floor == 1e-6 and cfg.general.fixed == {"Lumi": 0.0}
    assert cfg.optimization.steps == 20 and cfg.norm_factors[0].nominal == 1.5


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    ("old", "new", "where", "got"),
    [
        ("LearningRate: 0.05", "LearningRate: .nan", "Optimization.LearningRate", "nan"),
        ("Bandwidth: 0.36", "Bandwidth: .inf", "Optimization.Bandwidth", "inf"),
        ("Final: 0.02", "Final: .NaN", "Optimization.Temperature.Final", "nan"),
        ("Initial: 0.5", "Initial: .Inf", "Optimization.Temperature.Initial", "inf"),
        ("Bounds: [10.0, 200.0]", "Bounds: [10.0, .inf]", "Regions[0].Cuts[0].Bounds[1]", "inf"),
        ("[0.0, 1.0, 2.0, 3.0]", "[0.0, 1.0, 2.0, .inf]", "Regions[0].Binning[3]", "inf"),
        ("[0.0, 1.0, 2.0, 3.0]", "[-.inf, 1.0, 2.0, 3.0]", "Regions[0].Binning[0]", "-inf"),
        ("Value: 25.0", "Value: 1e999", "Regions[0].Cuts[1].Value", "inf"),
        ("Value: 60.0", "Value: -1.0e+999", "Regions[0].Cuts[0].Value", "-inf"),
        ("Normalization: -0.03", "Normalization: .nan", "Systematics[0].Down.Normalization", "nan"),
        ("Nominal: 1.5", "Nominal: .NAN", "NormFactors[0].Nominal", "nan"),
        ("Bounds: [-5.0, 10.0]", "Bounds: [-.inf, 10.0]", "NormFactors[0].Bounds[0]", "-inf"),
        ("YieldFloor: 1.0e-6", "YieldFloor: .nan", "General.YieldFloor", "nan"),
        ("Value: 0.0", "Value: .inf", "General.Fixed[0].Value", "inf"),
    ],
)
def test_nan_and_infinity_are_refused_with_their_yaml_path(tmp_path, old, new, where, got):
    text = message_of(write(tmp_path, edit(old, new)))
    assert text == f"bad.yaml: {where}: expected a finite number, got {got}"


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.2 and JSON read 1e-6 as a number; PyYAML alone would read the string '1e-6'."""
    text = edit("YieldFloor: 1.0e-6", "YieldFloor: 1e-6")
    text = edit("LearningRate: 0.05", "LearningRate: 5E-2", text)
    text = edit("Steps: 20", "Steps: 2e1", text)
    cfg = configuration.load(write(tmp_path, text, "ok.yaml"))
    assert cfg.general.yield_floor == float("1e-6")
    assert cfg.optimization.learning_rate == 0.05
    assert cfg.optimization.steps == 20 and type(cfg.optimization.steps) is int


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("Value: 60.0", "Value: true", "Regions[0].Cuts[0].Value: expected number, got True"),
        ("[0.0, 1.0, 2.0, 3.0]", "[0.0, false, 2.0, 3.0]", "Regions[0].Binning[1]: expected "),
        ("Nominal: 1.5", "Nominal: yes", "NormFactors[0].Nominal: expected number, got True"),
        ("Steps: 20", "Steps: true", "Optimization.Steps: expected integer, got True"),
        ("Up: {Normalization: 0.02}", "Up: {Normalization: on}", "Systematics[0].Up.Normal"),
    ],
)
def test_booleans_are_not_numbers(tmp_path, old, new, message):
    text = message_of(write(tmp_path, edit(old, new)))
    assert text.startswith(f"bad.yaml: {message}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"lead": true}', "cut 'lead' = True is not a finite number; expected a number within "),
        ('{"lead": 1e999}', "cut 'lead' = inf is not a finite number"),
        ('{"lead": "30"}', "cut 'lead' = '30' is not a finite number"),
        ('{"lead": NaN}', "not valid JSON: NaN is not a number; expected finite numbers"),
        ('{"lead": Infinity}', "not valid JSON: Infinity is not a number"),
        ('{"lead": -Infinity}', "not valid JSON: -Infinity is not a number"),
        ('{"lead": 30, "lead": 40}', "cut 'lead' is given twice; expected each cut once"),
        ('{"lead": 95.0}', "cut 'lead' = 95.0 is outside its Bounds [5.0, 90.0]"),
    ],
)
def test_cuts_file_values_are_finite_numbers(tmp_path, content, message):
    cfg = configuration.load(write(tmp_path, BASE, "base.yaml"))
    cuts = tmp_path / "cuts.json"
    cuts.write_text(content)
    with pytest.raises(ConfigError) as info:
        configuration.load_cuts(cuts, cfg)
    assert str(info.value).startswith(f"{cuts}: {message}")
    cuts.write_text('{"lead": 30, "SR:met<": 20}')
    assert configuration.load_cuts(cuts, cfg).cut_values() == {"SR:met<": 20.0, "lead": 30.0}


@pytest.mark.parametrize("value", [True, False, math.nan, -math.inf, None, "30"])
def test_with_cut_values_takes_only_finite_numbers(tmp_path, value):
    cfg = configuration.load(write(tmp_path, BASE, "base.yaml"))
    with pytest.raises(ConfigError, match=r"^cuts: cut 'SR:met<' = .* is not a finite number"):
        cfg.with_cut_values({"SR:met<": value})
    assert cfg.with_cut_values({"SR:met<": 11}).cut_values()["SR:met<"] == 11.0


# ----------------------------------------------------------------------------- duplicate keys
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    text = edit("    Variable: x\n", "    Variable: x\n    Name: CR\n")  # lines 9 and 11
    assert message_of(write(tmp_path, text)) == (
        f"{tmp_path / 'bad.yaml'}: duplicate key 'Name' at lines 9 and 11"
    )
    text = edit("  Steps: 20\n", "  Steps: 20\n  Seed: 1\n  Steps: 30\n")
    assert message_of(write(tmp_path, text)).endswith("duplicate key 'Steps' at lines 27 and 29")
    text = edit("Normalization: 0.02}", "Normalization: 0.02, Normalization: 0.05}")
    assert message_of(write(tmp_path, text)).endswith(
        "duplicate key 'Normalization' at line 22, twice"
    )
    text = BASE + "Regions: []\n"
    assert message_of(write(tmp_path, text)).endswith("duplicate key 'Regions' at lines 8 and 31")


def test_merge_keys_may_be_overridden(tmp_path):
    text = edit(
        "  - {Name: Background, Tree: bkg, SamplePath: mc.root}\n",
        "  - &bkg {Name: Background, Tree: bkg, SamplePath: mc.root}\n"
        "  - <<: *bkg\n"
        "    Name: Other\n",
    )
    cfg = configuration.load(write(tmp_path, text, "merge.yaml"))
    assert [(s.name, s.tree) for s in cfg.samples][2:] == [("Background", "bkg"), ("Other", "bkg")]


# ----------------------------------------------------------------------------- aliases
def billion_laughs(levels=9, width=9):
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for k in range(1, levels):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused(tmp_path):
    text = billion_laughs()  # 9**9 = 387 million strings once written out
    assert len(text) < 2048
    path = write(tmp_path, text, "bomb.yaml")
    written = 1 + 9 + 9 + 9  # the top mapping, its 9 keys and 9 lists, the 9 'lol' strings
    assert message_of(path) == (
        f"{path}: YAML aliases expand the document from {written} nodes as written to more than "
        f"{written + configuration.MAX_ALIAS_NODES}; the expansion is too large "
        f"(expected aliases to add at most {configuration.MAX_ALIAS_NODES} nodes)"
    )


def test_alias_bomb_inside_a_configuration_is_refused(tmp_path):
    anchors = "".join(
        f"  - {{Name: n{k}, Regions: &r{k} [" + ", ".join([f"*r{k - 1}"] * 9) + "]}\n"
        for k in range(1, 9)
    )
    text = edit(
        "NormFactors:\n",
        "NormFactors:\n  - {Name: n0, Regions: &r0 [SR, SR, SR, SR, SR, SR, SR, SR, SR]}\n"
        + anchors,
    )
    path = write(tmp_path, text)
    assert "the expansion is too large" in message_of(path)


def test_recursive_alias_is_refused(tmp_path):
    text = edit("  Steps: 20\n", "  Steps: 20\n  Loop: &loop [1, *loop]\n")
    path = write(tmp_path, text)
    assert message_of(path) == (
        f"{path}: line 28: an alias refers to the node that contains it; expected a finite document"
    )


def test_ordinary_anchors_and_aliases_keep_working(tmp_path):
    text = edit(
        "    Binning: [0.0, 1.0, 2.0, 3.0]\n",
        "    Binning: &edges [0.0, 1.0, 2.0, 3.0]\n",
    )
    text = edit(
        "Samples:\n",
        "  - Name: CR\n    Variable: x\n    Binning: *edges\nSamples:\n",
        text,
    )
    text = edit("Tree: sig, SamplePath: mc.root}", "Tree: sig, Regions: &all [SR, CR]}", text)
    text = edit("Tree: bkg, SamplePath: mc.root}", "Tree: bkg, Regions: *all}", text)
    text = edit("{Name: mu, Samples: Signal,", "{Name: mu, Samples: Signal, Regions: *all,", text)
    cfg = configuration.load(write(tmp_path, text, "anchors.yaml"))
    assert [r.binning for r in cfg.regions] == [(0.0, 1.0, 2.0, 3.0)] * 2
    assert cfg.samples[1].regions == ("SR", "CR") and cfg.norm_factors[0].regions == ("SR", "CR")


def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "General: " + "[" * 5000 + "]" * 5000 + "\n")
    assert message_of(path) == f"{path}: YAML nested too deeply; expected a configuration"


# ----------------------------------------------------------------------------- names
EXPECTED_RULE = (
    "expected a name without '/', '\\', '{', '}' or control characters, not '.' or '..', "
    "not starting with '-' or with whitespace at either end"
)


@pytest.mark.parametrize(
    ("old", "new", "where", "shown", "problem"),
    [
        ("- Name: SR\n", "- Name: SR/high\n", "Regions[0].Name", "'SR/high'", "it contains '/'"),
        ("- Name: SR\n", "- Name: 'SR{1}'\n", "Regions[0].Name", "'SR{1}'", "it contains '{'"),
        ("{Name: Signal,", "{Name: '.',", "Samples[1].Name", "'.'", "it is '.'"),
        ("{Name: Background,", "{Name: '..',", "Samples[2].Name", "'..'", "it is '..'"),
        (
            "{Name: Background,",
            '{Name: "Bkg\\nx",',
            "Samples[2].Name",
            "'Bkg\\nx'",
            "it contains the control character '\\n'",
        ),
        (
            "- Name: Lumi\n",
            "- Name: 'Lu\\mi'\n",
            "Systematics[0].Name",
            "'Lu\\\\mi'",
            "it contains '\\\\'",
        ),
        ("{Name: mu,", "{Name: -mu,", "NormFactors[0].Name", "'-mu'", "it starts with '-'"),
    ],
)
def test_names_must_be_safe_file_names(tmp_path, old, new, where, shown, problem):
    text = message_of(write(tmp_path, edit(old, new)))
    assert text == (
        f"bad.yaml: {where}: {shown} cannot be used in file names, {problem}; {EXPECTED_RULE}"
    )


def test_empty_name_is_refused_by_the_schema(tmp_path):
    text = message_of(write(tmp_path, edit("{Name: Signal,", "{Name: '',")))
    assert text == "bad.yaml: Samples[1].Name: expected at least 1 character(s), got ''"


@pytest.mark.parametrize(
    "name",
    ["SR", "SR:mu1_pt>", "SR:iso_max<", "ttbar+jets", "Signal region 2", "v1.2-x_y", "Z→μμ", "a.."],
)
def test_ordinary_names_are_safe(name):
    assert configuration.file_name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "a\\b", "a\0b", "a\tb", "a\x7f", "a\x85", "-x", " x", "x\n", "{x}"],
)
def test_unsafe_names(name):
    assert configuration.file_name_problem(name) is not None


def test_ordinary_names_load(tmp_path):
    text = BASE.replace("SR", "Signal region 2").replace("Background", "ttbar+jets")
    cfg = configuration.load(write(tmp_path, text, "names.yaml"))
    assert [r.name for r in cfg.regions] == ["Signal region 2"]
    assert [s.name for s in cfg.samples] == ["Data", "Signal", "ttbar+jets"]
    assert [c.name for c in cfg.cuts] == ["Signal region 2:met<", "lead"]


# ----------------------------------------------------------------------------- through the CLI
CLI_CASES = {
    "nan": (edit("Nominal: 1.5", "Nominal: .nan"), "NormFactors[0].Nominal: expected a finite"),
    "duplicate": (BASE + "Samples: []\n", "duplicate key 'Samples' at lines 15 and 31"),
    "bomb": (billion_laughs(), "the expansion is too large"),
    "name": (edit("- Name: SR\n", "- Name: ../SR\n"), "Regions[0].Name: '../SR' cannot be used"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_validate_command_gives_one_line_and_exit_code_2(tmp_path, case):
    text, message = CLI_CASES[case]
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "bad.yaml: " in lines[0]
    assert message in lines[0], lines[0]


def test_real_process_refuses_the_alias_bomb_without_traceback(tmp_path):
    path = write(tmp_path, billion_laughs(), "bomb.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"Error: {path}: YAML aliases expand the document from 28 nodes as written to more than "
        f"{28 + configuration.MAX_ALIAS_NODES}; the expansion is too large "
        f"(expected aliases to add at most {configuration.MAX_ALIAS_NODES} nodes)"
    ]


def test_cut_names_are_keys_not_file_names(tmp_path):
    """A default cut name from an expression with '/' is fine: cut names only key cuts.json."""
    config = configuration.load(write(tmp_path, edit("{Variable: met,", "{Variable: met/2,")))
    assert "SR:met/2<" in config.cut_values()
