"""The expression language: values against numpy/awkward/analytic references, and hostile
expressions refused at validation (exit 2, one line naming the YAML path) with nothing written."""

from __future__ import annotations

import os
import pathlib
import re

import awkward as ak
import numpy as np
import pytest
import vector
from click.testing import CliRunner

from analysis import config as configuration
from analysis.cli import main
from analysis.errors import ConfigError, DataError
from analysis.expressions import (
    FUNCTIONS,
    METHODS,
    VECTOR_FIELDS,
    ExpressionError,
    definition_order,
    evaluate,
    parse,
    record_fields,
)
from analysis.io import read_events

RNG = np.random.default_rng(3)
N_MUON = RNG.integers(0, 4, size=200)
PT = RNG.exponential(25.0, size=int(N_MUON.sum())) + 5.0
ETA = RNG.normal(0.0, 1.5, size=PT.size)
PHI = RNG.uniform(-np.pi, np.pi, size=PT.size)
COLUMNS = {
    "x": RNG.normal(0.0, 2.0, size=200),
    "y": RNG.uniform(0.5, 3.0, size=200),
    "Muon_pt": ak.unflatten(PT, N_MUON),
    "Muon_eta": ak.unflatten(ETA, N_MUON),
    "Muon_phi": ak.unflatten(PHI, N_MUON),
}


def value(source: str, columns=None, fields=()):
    result, _ = evaluate(parse(source, "test", fields), columns or COLUMNS)
    return result


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("source", "reference"),
    [
        ("x * 2 + y ** 2 - x / y", lambda c: c["x"] * 2 + c["y"] ** 2 - c["x"] / c["y"]),
        ("x // y + x % y", lambda c: c["x"] // c["y"] + c["x"] % c["y"]),
        ("-x + +y", lambda c: -c["x"] + c["y"]),
        ("0 < y < 2", lambda c: (c["y"] > 0) & (c["y"] < 2)),
        ("x > 0 and y < 2 or x < -3", lambda c: ((c["x"] > 0) & (c["y"] < 2)) | (c["x"] < -3)),
        ("not x > 0", lambda c: ~(c["x"] > 0)),
        ("(x > 0) & ~(y > 1) | (x == y) ^ (x != 0)", None),
        ("abs(x) >= 1", lambda c: np.abs(c["x"]) >= 1),
        ("np.sqrt(y) * numpy.exp(-y)", lambda c: np.sqrt(c["y"]) * np.exp(-c["y"])),
        ("np.where(x > 0, x, 0.5 * y)", lambda c: np.where(c["x"] > 0, c["x"], 0.5 * c["y"])),
        ("np.clip(x, -1, 1)", lambda c: np.clip(c["x"], -1, 1)),
        (
            "np.hypot(x, y) + np.arctan2(y, x)",
            lambda c: np.hypot(c["x"], c["y"]) + np.arctan2(c["y"], c["x"]),
        ),
        ("np.pi * y", lambda c: np.pi * c["y"]),
        ("2 ** 3 * x", lambda c: 8.0 * c["x"]),
        ("(2 ** 60 + 1) * (x > 0)", lambda c: (2**60 + 1) * (c["x"] > 0)),
    ],
)
def test_arithmetic_against_numpy(source, reference):
    got = np.asarray(value(source))
    if reference is None:
        c = COLUMNS
        expected = (c["x"] > 0) & ~(c["y"] > 1) | (c["x"] == c["y"]) ^ (c["x"] != 0)
    else:
        expected = reference(COLUMNS)
    np.testing.assert_array_equal(got, np.asarray(expected))


def test_jagged_functions_against_python_loops():
    pt, eta = COLUMNS["Muon_pt"], COLUMNS["Muon_eta"]
    counts = value("ak.num(Muon_pt[abs(Muon_eta) < 1.5], axis=1)")
    assert ak.to_list(counts) == [sum(abs(e) < 1.5 for e in row) for row in ak.to_list(eta)]
    lead = value(
        "ak.fill_none(ak.firsts(Muon_pt[ak.argsort(Muon_pt, axis=1, ascending=False)]), -1)"
    )
    assert ak.to_list(lead) == [max(row) if row else -1 for row in ak.to_list(pt)]
    second = value("ak.fill_none(ak.pad_none(Muon_pt, 2, clip=True)[:, 1], 0.0)")
    assert ak.to_list(second) == [row[1] if len(row) > 1 else 0.0 for row in ak.to_list(pt)]
    total = value("ak.sum(Muon_pt * (Muon_eta > 0), axis=1)")
    np.testing.assert_allclose(
        ak.to_numpy(total),
        [
            sum(p for p, e in zip(r, s, strict=True) if e > 0)
            for r, s in zip(ak.to_list(pt), ak.to_list(eta), strict=True)
        ],
    )
    pairs = value("ak.num(ak.combinations(Muon_pt, 2), axis=1)")
    assert ak.to_list(pairs) == [n * (n - 1) // 2 for n in N_MUON]


def test_vector_mass_and_delta_r_against_formulas():
    zipped = "vector.zip({'pt': Muon_pt, 'eta': Muon_eta, 'phi': Muon_phi, 'mass': 0 * Muon_pt})"
    two = {k: v[N_MUON >= 2] for k, v in COLUMNS.items() if k.startswith("Muon")}
    fields = record_fields([zipped])
    muons = value(zipped, two, fields)
    columns = {**two, "muons": muons}
    mass = ak.to_numpy(value("(muons[:, 0] + muons[:, 1]).mass", columns, fields))
    dr = ak.to_numpy(value("muons[:, 0].deltaR(muons[:, 1])", columns, fields))
    pt0, pt1 = ak.to_numpy(two["Muon_pt"][:, 0]), ak.to_numpy(two["Muon_pt"][:, 1])
    deta = ak.to_numpy(two["Muon_eta"][:, 0] - two["Muon_eta"][:, 1])
    dphi = ak.to_numpy(two["Muon_phi"][:, 0] - two["Muon_phi"][:, 1])
    # massless: m^2 = 2 pt1 pt2 (cosh(deta) - cos(dphi))
    np.testing.assert_allclose(
        mass, np.sqrt(2 * pt0 * pt1 * (np.cosh(deta) - np.cos(dphi))), rtol=1e-9
    )
    dphi = (dphi + np.pi) % (2 * np.pi) - np.pi
    np.testing.assert_allclose(dr, np.hypot(deta, dphi), rtol=1e-12)
    np.testing.assert_allclose(ak.to_numpy(value("muons.pt[:, 0]", columns, fields)), pt0)


def test_record_fields_of_a_zip_are_readable():
    zipped = "ak.zip({'pt': Muon_pt, 'iso': 2 * Muon_pt})"
    fields = record_fields([zipped, "other"])
    assert fields == {"pt", "iso"}
    columns = {**COLUMNS, "mu": value(zipped, fields=fields)}
    got = value("ak.sum(mu.iso, axis=1)", columns, fields)
    np.testing.assert_allclose(
        ak.to_numpy(got), 2 * ak.to_numpy(ak.sum(COLUMNS["Muon_pt"], axis=1))
    )
    with pytest.raises(ConfigError, match="attribute 'iso' is not a record field"):
        parse("mu.iso", "Definitions[0].Expression")  # without the analysis's fields


def test_every_listed_name_exists():
    """The tables name real, pure functions and properties (a typo would only fail on use)."""
    assert all(callable(f.call) and 1 <= f.positional <= 3 for f in FUNCTIONS.values())
    muon = vector.zip({"pt": [1.0], "eta": [0.5], "phi": [0.1], "mass": [0.0]})
    for name in VECTOR_FIELDS:
        np.asarray(getattr(muon, name))
    for name in METHODS:
        assert callable(getattr(muon, name))


def test_warnings_are_returned_not_printed(recwarn):
    result, notes = evaluate(parse("np.where(x != 0, 1 / x, 0)", "t"), {"x": np.array([0.0, 2.0])})
    np.testing.assert_array_equal(result, [0.0, 0.5])
    assert notes == ["divide by zero encountered in divide"]
    assert len(recwarn) == 0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("2 ** 10 ** 10", "OverflowError"),  # integer powers are floats: no bignum hang
        ("ak.pad_none(Muon_pt, 10 ** 9)", "ak.pad_none would hold 2e+11 values, more than"),
        ("ak.combinations(ak.pad_none(Muon_pt, 60), 6, replacement=True)", "ak.combinations would"),
        ("ak.cartesian([Muon_pt, Muon_pt, Muon_pt, Muon_pt, Muon_pt])", "takes 1 to 4 arrays"),
        ("ak.cartesian([ak.pad_none(Muon_pt, 100)] + [ak.pad_none(Muon_pt, 100)])", "a list is"),
        (
            "ak.cartesian([ak.pad_none(Muon_pt, 100), ak.pad_none(Muon_pt, 100), "
            "ak.pad_none(Muon_pt, 100)])",
            "ak.cartesian would hold 2e+08 values",
        ),
        ("x[:, None] * x", "would broadcast all events against all events"),
        ("9223372036854775807 * 9223372036854775807", "gives an integer beyond 64 bits"),
        ("ak.concatenate([ak.pad_none(Muon_pt, 100000)] + [Muon_pt])", "a list is only"),
        (
            "ak.concatenate([ak.pad_none(Muon_pt, 400000), ak.pad_none(Muon_pt, 400000)], axis=1)",
            "ak.concatenate would hold 1.6e+08 values",
        ),
        ("missing + 1", "no column 'missing'"),
        ("x.pt", "has no record fields"),
        ("x[1.5]", "IndexError"),
    ],
)
def test_runtime_failures_are_one_line(source, message):
    with pytest.raises((ExpressionError, ConfigError), match=re.escape(message)) as err:
        value(source)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- hostile input
PWNED = "PWNED"  # every hostile expression below would create or read this file in the cwd
HOSTILE = {
    # module attribute chains to os / subprocess / ctypes / builtins
    "np.lib.format.os.system('touch PWNED')": "function 'np.lib.format.os.system' is not allowed",
    "np.testing.os.system('touch PWNED')": "is not allowed",
    "np.ctypeslib.ctypes.CDLL(None)": "function 'np.ctypeslib.ctypes.CDLL' is not allowed",
    "np.f2py.os.popen('touch PWNED').read()": "calling a method is not allowed",
    "numpy.lib.npyio.os.remove('PWNED')": "is not allowed",
    "awkward.typetracer.subprocess.run(['touch', 'PWNED'])": "is not allowed",
    "ak.operations.builtins.exec('1')": "is not allowed",
    "vector.backends.numpy.os.system('touch PWNED')": "is not allowed",
    "np.ma.core.builtins.eval('1')": "is not allowed",
    "x.lib.os.system('touch PWNED')": "calling a method is not allowed",
    "x.lib": "attribute 'lib' is not a record field",
    "np.os": "'np.os' is not an allowed constant",
    "np": "module 'np' can only be used to call a listed function",
    # file functions, pickles, memory maps
    "np.save('PWNED', x)": "function 'np.save' is not allowed",
    "np.load('PWNED.npy', allow_pickle=True)": "function 'np.load' is not allowed",
    "np.memmap('PWNED', mode='w+', shape=(4,))": "function 'np.memmap' is not allowed",
    "np.lib.format.open_memmap('PWNED', mode='w+', shape=(2,))": "is not allowed",
    "np.loadtxt('/etc/passwd')": "function 'np.loadtxt' is not allowed",
    "np.fromfile('/etc/passwd')": "function 'np.fromfile' is not allowed",
    "np.rec.fromfile('/etc/passwd', formats='f8')": "function 'np.rec.fromfile' is not allowed",
    "np.savetxt('PWNED', x)": "function 'np.savetxt' is not allowed",
    "np.genfromtxt('/etc/passwd')": "is not allowed",
    "ak.to_json(x, 'PWNED')": "function 'ak.to_json' is not allowed",
    "ak.to_parquet(x, 'PWNED')": "function 'ak.to_parquet' is not allowed",
    "ak.from_json('/etc/passwd')": "function 'ak.from_json' is not allowed",
    "x.tofile('PWNED')": "calling a method is not allowed",
    "ak.sum(x, allow_pickle=True)": "keyword 'allow_pickle' is not allowed for ak.sum",
    "np.sqrt(x, out=x)": "keyword 'out' is not allowed for np.sqrt",
    "ak.max(x, axis=1, **{'behavior': 1})": "'**' arguments are not allowed",
    # str.format attribute walks
    "'{0.__class__.__init__.__globals__}'.format(x)": "calling a method is not allowed",
    "'{0.lib}'.format(x)": "calling a method is not allowed",
    "str.format('{0}', x)": "calling a method is not allowed",
    # lambdas, comprehensions, generator frames, walrus, f-strings
    "(lambda: 0)()": "calling the result of an expression is not allowed",
    "np.where(x > 0, (lambda: 1), 0)": "a lambda is not allowed",
    "[c for c in x]": "a list comprehension is not allowed",
    "np.sum([c for c in x])": "a list comprehension is not allowed",
    "ak.sum((g for g in x).gi_frame.f_globals)": "attribute 'f_globals' is not a record field",
    "np.sum((g for g in x))": "a generator expression is not allowed",
    "{k: 1 for k in 'ab'}": "a dict comprehension is not allowed",
    "np.where(x > 0, (y := x), 0)": "an assignment (:=) is not allowed",
    "f'{x!r:>{10}}'": "an f-string is not allowed",
    # dunder strings built by concatenation, dunder names and attributes
    "x['__cl' + 'ass__']": "a string is not allowed here",
    "x['__class__']": "this string is not allowed",
    "vector.zip({'__class__': x})": "this string is not allowed",
    "x.__class__.__mro__[1].__subclasses__()": "is not allowed",
    "__import__('os').system('touch PWNED')": "is not allowed",
    "_hidden + x": "name '_hidden' is not allowed",
    "np.char.add('__cl', 'ass__')": "function 'np.char.add' is not allowed",
    "'a' * 100000000": "a string is not allowed here",
    # calls on the result of calls, builtins and unknown functions
    "np.sum(x)(1)": "calling the result of an expression is not allowed",
    "np.vectorize(abs)(x)": "calling the result of an expression is not allowed",
    "np.frompyfunc(abs, 1, 1)": "function 'np.frompyfunc' is not allowed",
    "abs(x).item()": "calling a method is not allowed",
    "ak.num(x).__class__": "attribute '__class__' is not a record field",
    "open('/etc/passwd').read()": "calling a method is not allowed",
    "open('/etc/passwd')": "function 'open' is not allowed",
    "eval('1')": "function 'eval' is not allowed",
    "getattr(x, 'lib')": "function 'getattr' is not allowed",
    "len(x)": "function 'len' is not allowed",
    "abs": "function 'abs' can only be called",
    "x if x else x": "a conditional expression (use np.where) is not allowed",
    "x @ x": "operator '@' is not allowed",
    "1 << 100000000": "operator '<<' is not allowed",
    "x in x": "comparison 'in' is not allowed",
    "{'a': x}": "a dict is only allowed as the first argument of ak.argcartesian",
    # positional arguments past the listed ones (out, dtype, shape, copy), big numbers
    "np.clip(x, 5, 5, x)": "np.clip takes at most 3 positional argument(s), got 4",
    "np.sqrt(x, x)": "np.sqrt takes at most 1 positional argument(s), got 2",
    "np.ones_like(1, 'O')": "np.ones_like takes at most 1 positional argument(s), got 2",
    "np.zeros_like(1, 'f8', 'K', True, [30000, 30000])": "takes at most 1 positional",
    "ak.drop_none(x, None, False)": "ak.drop_none takes at most 2 positional argument(s), got 3",
    "1" + "0" * 400: "an integer beyond 64 bits is not allowed",
    "ak.cartesian([x] * 7)": "a list is only allowed as the first argument of",
    "np.abs([x])[0][:, True] < np.abs([x])": "a list is only allowed as the first argument of",
    "x[:, True]": "a boolean is not an index",
    "np.where(x > 0, {'a': x}, 0)": "a dict is only allowed as the first argument of",
    "np.where(True, 'a', 'b')[()] * 6000000000": "a string is not allowed here",
    "np.where(True, '_', 'b') + np.where(True, '_', 'b')": "a string is not allowed here",
    "ak.ones_like('abc')": "a string is not allowed here",
    "ak.fill_none(x, '__')": "a string is not allowed here",
}


def test_at_least_thirty_hostile_expressions():
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize("source", sorted(HOSTILE))
def test_hostile_expression_is_refused_by_parse(source):
    with pytest.raises(ConfigError) as err:
        parse(source, "Definitions[2].Expression")
    message = str(err.value)
    assert message.startswith("Definitions[2].Expression: ")
    assert HOSTILE[source] in message
    assert "\n" not in message


def _tree_snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


# where an expression sits in an analysis file, and the YAML path the message names
PLACES = {
    "Definitions[2].Expression": lambda c, e: c["Definitions"].append(
        {"Name": "evil", "Expression": e}
    ),
    "Regions[0].Filter": lambda c, e: c["Regions"][0].update(Filter=e),
    "Regions[0].Variable": lambda c, e: c["Regions"][0].update(Variable=e),
    "Regions[0].Cuts[1].Variable": lambda c, e: c["Regions"][0]["Cuts"][1].update(Variable=e),
    "Samples[1].Weight": lambda c, e: c["Samples"][1].update(Weight=e),
    "Samples[2].Filter": lambda c, e: c["Samples"][2].update(Filter=e),
    "Systematics[2].Up.Weight": lambda c, e: c["Systematics"][2]["Up"].update(Weight=e),
    "Systematics[2].Down.Weight": lambda c, e: c["Systematics"][2]["Down"].update(Weight=e),
}


def test_hostile_expressions_refused_by_every_command_with_nothing_written(
    toy, tmp_path, monkeypatch
):
    """Every hostile expression in every place of an analysis file: ``diffana validate`` exits 2
    with one line naming the file, YAML path and offending piece; the commands that read events
    do the same before opening a file; no file appears or changes anywhere under the folder."""
    import copy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIFFANA_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    configs = []
    for i, source in enumerate(sorted(HOSTILE)):
        place = sorted(PLACES)[i % len(PLACES)]
        raw = copy.deepcopy(toy.config)
        PLACES[place](raw, source)
        configs.append((source, place, toy.write_config(raw, name=f"evil{i}.yaml")))
    before = _tree_snapshot(tmp_path)
    for source, place, path in configs:
        result = runner.invoke(main, ["validate", str(path)])
        assert result.exit_code == 2, (source, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path.name}: {place}: "), lines
        assert HOSTILE[source] in lines[0]
    out = tmp_path / "out"
    commands = [
        ["histograms", "--output", str(out / "h.json")],
        ["workspace", "--output", str(out / "ws.json")],
        ["cutflow", "--output", str(out / "cf.json")],
        ["fit", "--output", str(out / "fit.json")],
        ["significance", "--output", str(out / "z.json")],
        ["optimize", "--out", str(out / "opt"), "--steps", "2"],
    ]
    for k, (source, place, path) in enumerate(configs):
        command = commands[k % len(commands)]
        result = runner.invoke(main, [command[0], str(path), *command[1:]])
        assert result.exit_code == 2, (command, source, result.output)
        assert result.stderr.strip().startswith(f"Error: {path.name}: {place}: ")
    assert _tree_snapshot(tmp_path) == before
    assert not out.exists()
    assert not list(pathlib.Path(os.getcwd()).glob(PWNED + "*"))


def test_expression_warnings_fold_into_the_error_line(toy, capfd):
    """A Definition that divides by zero: one error line that carries numpy's warning."""
    toy.config["Definitions"].append({"Name": "ratio", "Expression": "met / (met - met)"})
    toy.config["Regions"][0]["Cuts"][1]["Variable"] = "ratio"
    cfg = configuration.from_dict(toy.config)
    with pytest.raises(DataError) as err:
        read_events(cfg, progress=False)
    message = str(err.value)
    assert "'ratio' is not finite for" in message
    assert "(while evaluating: Definition 'ratio': " in message
    assert "encountered in divide)" in message
    assert capfd.readouterr().err == ""


def test_reserved_names_and_readme_table_match_the_allowlist():
    """Definitions may not shadow what expressions can call, and the README documents every
    function of the table (the language reference users read)."""
    from analysis.config import RESERVED_NAMES
    from analysis.expressions import MODULES

    assert set(MODULES) | {n for n in FUNCTIONS if "." not in n} == RESERVED_NAMES
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Expressions") :]
    for name in FUNCTIONS:
        assert name.split(".")[-1] in section, name
    for name in METHODS | VECTOR_FIELDS:
        assert name.rstrip("2") in section, name


def test_workflow_refuses_a_hostile_analysis_before_any_rule(tmp_path):
    """``snakemake`` on an analysis whose Definition reaches os.system: the Snakefile validates
    the analysis when it is parsed, stops with the one-line error, and no rule runs."""
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(root / "Snakefile", repo / "Snakefile")
    shutil.copytree(root / "workflows", repo / "workflows")
    demo = (root / "models" / "dimuon.yaml").read_text()
    evil = "np.lib.format.os.system('touch PWNED')"
    (repo / "models" / "evil.yaml").write_text(
        demo.replace('Expression: "Muon_pt[:, 0]"', f'Expression: "{evil}"')
    )
    snakemake = pathlib.Path(sys.executable).parent / "snakemake"
    run = tmp_path / "run"
    result = subprocess.run(
        [str(snakemake), "-c1", "-s", str(repo / "Snakefile"), "-d", str(run)]
        + ["--config", "analysis=evil"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        "Error: evil.yaml: Definitions[0].Expression: function 'np.lib.format.os.system' is "
        "not allowed" in result.stderr
    )
    assert not list(tmp_path.rglob(PWNED))
    # no rule ran: only Snakemake's own log folder exists
    assert {p.relative_to(run).parts[0] for p in run.rglob("*")} <= {".snakemake"}


@pytest.mark.parametrize(
    "source", ["+".join(["x"] * 3000), "-" * 3000 + "x", "x" + ".pt" * 1500, "x" + "[0]" * 1200]
)
def test_deep_nesting_is_one_line(source):
    """Expressions nested deeper than Python's recursion allows: one ConfigError line, at parse
    and when the analysis's record fields are collected."""
    assert record_fields([source]) == frozenset()
    with pytest.raises(ConfigError, match="nested too deeply|characters; expected at most"):
        parse(source, "Regions[0].Filter")


def test_a_coffea_style_pair_selection():
    """Z candidates from muon pairs with named fields (coffea's idiom), against a Python loop."""
    sources = [
        "ak.combinations(Muon_pt, 2, fields=['a', 'b'])",
        "ak.fill_none(ak.max(pairs.a + pairs.b, axis=1), 0.0)",
    ]
    fields = record_fields(sources)
    assert {"a", "b"} <= fields
    columns = {**COLUMNS, "pairs": value(sources[0], fields=fields)}
    got = ak.to_list(value(sources[1], columns, fields))
    expected = [
        max((p + q for i, p in enumerate(row) for q in row[i + 1 :]), default=0.0)
        for row in ak.to_list(COLUMNS["Muon_pt"])
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    first = ak.to_numpy(value("ak.fill_none(ak.firsts(Muon_pt), np.nan)"))
    np.testing.assert_array_equal(np.isnan(first), N_MUON == 0)


def test_definitions_of_a_chunk_share_one_memory_budget(toy, monkeypatch):
    """Definitions each within the per-value limit but together above the per-chunk budget
    (lowered here to 2 MiB so that the test stays small): one DataError naming the Definition
    that crossed it, before the next one is evaluated."""
    from analysis import io

    monkeypatch.setattr(io, "DEFINITIONS_BUDGET", 2 * 2**20)
    for i in range(4):
        toy.config["Definitions"].append(
            {"Name": f"pad{i}", "Expression": f"ak.fill_none(ak.pad_none(Muon_pt, 40), {i}.0)"}
        )
    toy.config["Regions"][0]["Filter"] = " & ".join(
        f"(ak.sum(pad{i}, axis=1) > -1)" for i in range(4)
    )
    cfg = configuration.from_dict(toy.config)
    with pytest.raises(DataError, match=r"Definitions up to 'pad\d' hold .* GiB for one chunk"):
        read_events(cfg, progress=False)


def test_regular_dimensions_broadcast_within_events():
    """keepdims=True and x[:, None] make regular dimensions, which awkward broadcasts like NumPy
    (an events-by-events or objects-by-objects outer product: a memory bomb from a short
    expression). Values are turned into variable-length lists, so they broadcast within each
    event (against a Python loop) and a list of one against a longer list is an error."""
    got = value("ak.sum(ak.sum(Muon_pt, axis=1, keepdims=True) + x, axis=1)")
    pt = ak.to_list(COLUMNS["Muon_pt"])
    expected = [sum(row) + xi for row, xi in zip(pt, COLUMNS["x"], strict=True)]
    np.testing.assert_allclose(ak.to_numpy(got), expected, rtol=1e-12)
    lead = value("Muon_pt[ak.argmax(Muon_pt, axis=1, keepdims=True)]")
    assert ak.to_list(ak.firsts(lead)) == [max(row) if row else None for row in pt]
    with pytest.raises(ExpressionError, match="cannot broadcast nested list"):
        value("Muon_pt[:, None] + Muon_pt[:, :, None]")


def test_stack_builds_collections_from_flat_columns():
    """``np.stack`` has numpy's semantics (against ``np.stack`` on the flat columns), also for
    jagged arrays of one structure (against a Python loop), and turns the flat columns of two
    muons into one list per event, so vector.zip gives a collection (mass against the formula
    for two massless muons at the same phi: m^2 = 2 pt1 pt2 (cosh(deta) - 1))."""
    flat = {"a": COLUMNS["x"], "b": COLUMNS["y"]}
    for axis in (0, 1):
        got = ak.to_numpy(value(f"np.stack([a, b], axis={axis})", flat))
        np.testing.assert_array_equal(got, np.stack([flat["a"], flat["b"]], axis=axis))
    pairs = ak.to_list(value("np.stack([Muon_pt, Muon_eta], axis=2)"))
    pt, eta = ak.to_list(COLUMNS["Muon_pt"]), ak.to_list(COLUMNS["Muon_eta"])
    assert pairs == [
        [[p, e] for p, e in zip(ps, es, strict=True)] for ps, es in zip(pt, eta, strict=True)
    ]
    source = (
        "vector.zip({'pt': np.stack([pt1, pt2], axis=1), 'eta': np.stack([eta1, eta2], axis=1), "
        "'phi': np.stack([0 * pt1, 0 * pt2], axis=1), "
        "'mass': np.stack([0 * pt1, 0 * pt2], axis=1)})"
    )
    two = {
        "pt1": RNG.uniform(10, 50, 50),
        "pt2": RNG.uniform(10, 50, 50),
        "eta1": RNG.uniform(-2, 2, 50),
        "eta2": RNG.uniform(-2, 2, 50),
    }
    mass = ak.to_numpy(value(f"(({source})[:, 0] + ({source})[:, 1]).mass", two))
    deta = two["eta1"] - two["eta2"]
    expected = np.sqrt(2 * two["pt1"] * two["pt2"] * (np.cosh(deta) - 1))
    np.testing.assert_allclose(mass, expected, rtol=1e-9)
    with pytest.raises(ExpressionError, match="np.stack axis must be an integer from 0 to 1"):
        value("np.stack([x, y], axis=2)")
    with pytest.raises(ExpressionError, match="np.stack takes a list of arrays"):
        value("np.stack([x, 1.0], axis=1)")
    with pytest.raises(ConfigError, match="keyword 'out' is not allowed for np.stack"):
        parse("np.stack([x, y], out=x)", "test")


def test_definition_order_follows_what_each_definition_reads():
    """Each Definition after those it reads, otherwise in the given order; a Definition that
    reads its own name reads the branch (no cycle); other cycles are named."""
    reads = {
        "mass": {"lead", "sub"},
        "lead": {"muons"},
        "sub": {"muons"},
        "muons": {"pt"},
        "pt": {"pt"},
        "other": {"x"},
    }
    assert definition_order(reads, "w") == ["pt", "muons", "lead", "sub", "mass", "other"]
    with pytest.raises(ConfigError, match=r"^w: Definitions 'a' -> 'b' -> 'a' form a cycle"):
        definition_order({"a": {"b"}, "b": {"a"}}, "w")
    chain = {f"d{i}": {f"d{i + 1}"} for i in range(5000)}  # no recursion limit
    assert definition_order(chain, "w")[:2] == ["d4999", "d4998"]
