"""The Snakemake workflow runs end to end (real snakemake, small event count): every declared
output is made, the numbers in them agree with independent computations, the report holds
every section with images that decode and are not blank, and a second run has nothing to do."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pyhf
import pytest
import yaml

from analysis.report import format_value

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVENTS, STEPS = 20000, 20
REPORT_SECTIONS = [
    "Results before and after optimization",
    "Optimization",
    "Cuts and cut flow",
    "Fit at the optimized cuts",
    "Fit at the start cuts",
    "Systematic variations at the optimized cuts",
    "Software and configuration",
]


class _Report(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = self._in_h2 or tag == "h2"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self._in_h2 = self._in_h2 and tag != "h2"

    def handle_data(self, data):
        if self._in_h2 and data.strip():
            self.headings.append(data.strip())


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """(working directory, snakemake command, environment) after one full run."""
    bin_dir = pathlib.Path(sys.executable).parent
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    snakemake = shutil.which("snakemake", path=path)
    if snakemake is None:
        pytest.fail("snakemake is not installed in this environment")
    env = dict(os.environ, PATH=path, OMP_NUM_THREADS="1")
    folder = tmp_path_factory.mktemp("workflow")
    command = [
        snakemake,
        "-c2",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(folder),
        "--config",
        f"events={EVENTS}",
        f"steps={STEPS}",
        "device=cpu",
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, command, env


def test_every_declared_output_exists_and_a_second_run_does_nothing(workflow):
    folder, command, env = workflow
    summary = subprocess.run(
        command + ["--summary"], capture_output=True, text=True, env=env, check=True, timeout=300
    ).stdout
    outputs = [line.split("\t")[0] for line in summary.splitlines()[1:] if line.strip()]
    # 5 ROOT files, optimize/{result,cuts}.json, cutflow.json, report.html; per cut set 8 JSON
    # results and PNG + PDF of pre-/post-fit per region, pulls, correlation, ranking, scan and
    # the CLs figure (blinded: expected only);
    # PNG + PDF of the optimization history, soft-vs-hard and cut flow (per region)
    regions = len(yaml.safe_load((ROOT / "models" / "dimuon.yaml").read_text())["Regions"])
    # the folder of systematic-template plots and blinding.json
    expected = 5 + 2 + 1 + 1 + 2 * (8 + 2 * (2 * regions + 5)) + 2 * (1 + 2 * regions) + 1 + 1
    assert len(outputs) == expected, outputs
    for name in outputs:
        path = folder / name
        files = sorted(path.glob("*.p??")) if path.is_dir() else [path]  # PNG and PDF
        assert files and all(f.is_file() and f.stat().st_size > 0 for f in files), name
    again = subprocess.run(
        command + ["--dry-run"], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_results_agree_with_independent_computations(workflow):
    folder, _, _ = workflow
    results = folder / "results" / "dimuon"
    optimized = json.loads((results / "optimize" / "cuts.json").read_text())
    result = json.loads((results / "optimize" / "result.json").read_text())
    assert len(result["history"]) == STEPS and result["best"]["cuts"] == optimized
    cutflow = json.loads((results / "cutflow.json").read_text())
    assert {row["name"]: row["optimized"] for row in cutflow["cuts"]} == optimized
    for cuts in ("start", "optimized"):
        workspace = json.loads((results / cuts / "workspace.json").read_text())
        histograms = json.loads((results / cuts / "histograms.json").read_text())
        # the cut flow's last step is what the histograms hold
        flow = cutflow[cuts]["SR"]
        channel = next(c for c in workspace["channels"] if c["name"] == "SR")
        for sample in channel["samples"]:
            name = sample["name"]
            total = sum(histograms["SR"][name]["nominal"]["yields"])
            assert flow["yields"][name][-1] == pytest.approx(total, rel=1e-9, abs=1e-9)
        # diffana's fit against pyhf's fit of the same workspace (the workflow's cross-check)
        fit = json.loads((results / cuts / "fit.json").read_text())
        pyhf_fit = json.loads((results / cuts / "pyhf_fit.json").read_text())
        mu = dict(zip(fit["labels"], fit["bestfit"], strict=True))["mu"]
        assert mu == pytest.approx(pyhf_fit["mle_parameters"]["mu"][0], abs=2e-3)
        # the expected significance against pyhf's asymptotic discovery test
        significance = json.loads((results / cuts / "significance.json").read_text())
        pyhf_workspace = pyhf.Workspace(workspace)
        model = pyhf_workspace.model()
        observed_p0, expected_p0 = pyhf.infer.hypotest(
            0.0, pyhf_workspace.data(model), model, test_stat="q0", return_expected=True
        )
        assert significance["observed"]["p_value"] == pytest.approx(float(observed_p0), rel=2e-2)
        assert significance["expected"]["p_value"] == pytest.approx(float(expected_p0), rel=2e-2)
    # at 20,000 events the demo's background MC is below the default guard (10 effective events
    # per bin) already at the starting cuts: no point is eligible, the initial one is reported
    # (honestly, with the thin bins named); with enough MC the optimizer improves on it
    assert result["best"]["hard"] >= result["initial"]["hard"]
    if result["best"]["cuts"] == result["initial"]["cuts"]:
        assert result["initial"]["below_guard"]


def test_report_has_every_section_and_its_images_are_not_blank(workflow):
    folder, _, _ = workflow
    text = (folder / "results" / "dimuon" / "report.html").read_text()
    report = _Report()
    report.feed(text)
    assert report.headings[1:] == REPORT_SECTIONS  # after "Contents"
    # per cut set: pre-fit, post-fit, pulls, correlation, ranking, scan, CLs (expected only); the
    # optimization history, soft against hard, the cut flow and one figure per (region,
    # sample, systematic) with variations at the optimized cuts
    histograms = json.loads((folder / "results/dimuon/optimized/histograms.json").read_text())
    varied = {
        (region, sample, variation.rsplit("_", 1)[0])
        for region, samples in histograms.items()
        for sample, variations in samples.items()
        for variation in variations
        if variation != "nominal"
    }
    assert len({(sample, syst) for _, sample, syst in varied}) == 8  # 4 MC samples x 2
    regions = len(histograms)
    # + 1: the effective MC events per bin at the initial and best cuts (optimization section)
    expected = 2 * (2 * regions + 5) + 1 + 2 * regions + len(varied) + 1
    assert len(report.images) == expected
    for src in report.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(src[len(prefix) :])))
        assert pixels.shape[0] > 200 and float(np.std(pixels[..., :3])) > 0.05
    for needle in (
        "expected significance Z0",
        "Cut flow, SR",
        "Post-fit yields",
        "software versions",
        "dimuon.yaml",
        "pyhf",
    ):
        assert needle in text, needle


def test_notebook_rule_gives_the_optimize_rule_cuts(workflow):
    """`snakemake tuning` runs the tuning notebook as a `notebook:` rule on the workflow's data:
    same steps and seed as the optimize rule, so the same cuts; the executed notebook is its
    log, with the optimization history plotted."""
    folder, command, env = workflow
    proc = subprocess.run(
        [*command, "--", "tuning"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = folder / "results" / "dimuon"
    tuned = json.loads((results / "tuning" / "cuts.json").read_text())
    assert tuned == json.loads((results / "optimize" / "cuts.json").read_text())
    executed = json.loads((results / "logs" / "tuning.ipynb").read_text())
    outputs = [o for cell in executed["cells"] for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


@pytest.mark.parametrize(("settings", "generates"), [([], True), (["data_dir=elsewhere"], False)])
def test_demo_files_are_generated_only_for_an_analysis_that_reads_them(
    tmp_path, settings, generates
):
    """``generate: auto``: the generate rule is in the DAG when the analysis' InputPath lies in
    ``data_dir`` (the demo), not otherwise (another analysis, its own files)."""
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    command = [str(bin_dir / "snakemake"), "-n", "-c1", "-s", str(ROOT / "Snakefile")]
    command += ["-d", str(tmp_path), "--config", "device=cpu", *settings]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [line.split()[0] for line in proc.stdout.splitlines() if line[:1].isalpha()]
    assert ("generate" in jobs) == generates, proc.stdout[-2000:]


# ----------------------------------------------------------------------------- any analysis
TINY_EDGES = [0.0, 1.0, 2.0, 3.0, 4.0]
TINY_CUT = 0.2  # SR and CR: y > TINY_CUT (trainable; the optimizer may move it)


def _tiny_columns(rng, n, x_scale, signal_fraction_sr):
    """x: the observable; y: the cut variable; z > 0 selects the SR, z <= 0 the CR."""
    return {
        "x": rng.exponential(x_scale, n).clip(0.0, 3.999),
        "y": rng.uniform(0.0, 1.0, n),
        "z": np.where(rng.uniform(size=n) < signal_fraction_sr, 1.0, -1.0),
        "w": np.full(n, 0.5),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small analysis unlike the demo, run by snakemake from a path outside models/: one
    Signal and one Control region, a free background normalisation, only a Normalization
    systematic (no shape variations), and data with a large excess in the signal region.
    Returns (working directory, results folder, observed SR counts, the raw columns)."""
    from tests.conftest import write_tree

    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(11)
    columns = {
        "sig": _tiny_columns(rng, 400, 0.6, 0.95),  # signal: low x, mostly in the SR
        "bkg": _tiny_columns(rng, 3000, 2.0, 0.3),  # background: flat-ish x, mostly in the CR
    }
    # pseudo-data: the background (weight 0.5) and three times the signal
    bkg = _tiny_columns(rng, 1500, 2.0, 0.3)
    sig = _tiny_columns(rng, 600, 0.6, 0.95)
    columns["data"] = {k: np.concatenate([bkg[k], sig[k]]) for k in ("x", "y", "z")}
    inputs = folder / "inputs"
    inputs.mkdir()
    for name in ("sig", "bkg"):
        write_tree(inputs / "mc.root", name, columns[name])
    write_tree(inputs / "data.root", "data", columns["data"])
    cut = {"Name": "ycut", "Variable": "y", "Direction": ">", "Value": TINY_CUT}
    analysis = {
        "General": {
            "Measurement": "tiny",
            "POI": "mu",
            "InputPath": str(inputs / "{SamplePath}"),
        },
        "Regions": [
            {
                "Name": "SR",
                "Variable": "x",
                "Binning": TINY_EDGES,
                "Filter": "z > 0",
                "Cuts": [{**cut, "Bounds": [0.0, 0.6]}],
            },
            {
                "Name": "CR",
                "Type": "Control",
                "Variable": "x",
                "Binning": TINY_EDGES,
                "Filter": "z <= 0",
                "Cuts": [{**cut, "Name": "ycut_cr", "Trainable": False}],
            },
        ],  # fmt: skip
        "Samples": [
            {"Name": "Data", "Tree": "data", "SamplePath": "data.root", "Data": True},
            {"Name": "Signal", "Tree": "sig", "SamplePath": "mc.root", "Weight": "w"},
            {"Name": "Background", "Tree": "bkg", "SamplePath": "mc.root", "Weight": "w"},
        ],
        "NormFactors": [
            {"Name": "mu", "Samples": "Signal", "Nominal": 1, "Bounds": [0, 20]},
            {"Name": "k_bkg", "Samples": "Background", "Nominal": 1, "Bounds": [0.1, 5]},
        ],
        "Systematics": [
            {
                "Name": "Lumi",
                "Type": "Normalization",
                "Up": {"Normalization": 0.02},
                "Down": {"Normalization": -0.02},
            },
        ],  # fmt: skip
        "Optimization": {"Steps": 2, "EvaluateEvery": 1},
    }
    (folder / "analyses").mkdir()
    (folder / "analyses" / "sr_cr.yaml").write_text(yaml.safe_dump(analysis))
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]))
    env["OMP_NUM_THREADS"] = "1"
    snakemake = [
        str(bin_dir / "snakemake"),
        "-c2",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(folder),
    ]
    settings = ["--config", "analysis=analyses/sr_cr.yaml", "device=cpu", "steps=2"]
    results = folder / "results" / "sr_cr"

    def run(command):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def report(*options):
        command = [str(bin_dir / "diffana"), "report", str(results), "--config"]
        command += [str(folder / "analyses" / "sr_cr.yaml"), *options, "--output"]
        run([*command, str(folder / f"report{'_'.join(options)}.html")])
        return (folder / f"report{'_'.join(options)}.html").read_text()

    # the whole DAG: no template plots without shape systematics, the report at the end
    jobs = run([*snakemake, "-n", *settings])
    # one real run of the rules blinding touches, at the starting cuts (a full run takes ~40
    # diffana processes; the demo's full run above draws the blinded distributions); the
    # report on this partial folder names what is missing
    targets = ["blinding.json", "start/significance.json"]
    run([*snakemake, *(f"results/sr_cr/{t}" for t in targets), *settings])
    blinded = {p.relative_to(results).as_posix(): p.read_text() for p in results.rglob("*.json")}
    blinded["report.html"] = report()
    # unblinded: the workspace and significance are remade with the signal region's data
    run([*snakemake, *(f"results/sr_cr/{t}" for t in targets), *settings, "unblind=true"])
    unblinded = {p.relative_to(results).as_posix(): p.read_text() for p in results.rglob("*.json")}
    unblinded["report.html"] = report("--unblind")
    data = columns["data"]
    observed = {}
    for region, selected in (("SR", data["z"] > 0), ("CR", data["z"] <= 0)):
        keep = selected & (data["y"] > TINY_CUT)
        observed[region] = np.histogram(data["x"][keep], TINY_EDGES)[0].astype(float)
    return {"jobs": jobs, "blinded": blinded, "unblinded": unblinded, "observed": observed}


def _number_lists(node):
    """Every list of numbers inside a JSON document."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _number_lists(value)
    elif isinstance(node, list):
        if node and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in node):
            yield node
        for value in node:
            yield from _number_lists(value)


def _contains_run(values, run):
    n = len(run)
    return any(list(values[i : i + n]) == list(run) for i in range(len(values) - n + 1))


def _text(html_text):
    """The report without its embedded images."""
    import re

    return re.sub(r'src="data:image/png;base64,[^"]*"', "", html_text)


def _real_workspace(blinded_workspace, observed_sr):
    spec = json.loads(blinded_workspace)
    for observation in spec["observations"]:
        if observation["name"] == "SR":
            observation["data"] = observed_sr.tolist()
    return spec


def test_tiny_analysis_has_no_template_rule_and_ends_with_the_report(tiny):
    jobs = [line.split()[0] for line in tiny["jobs"].splitlines() if line[:1].isalpha()]
    assert "report" in jobs and "blinding" in jobs
    assert "plot_templates" not in jobs  # only Normalization systematics: nothing to draw


def test_blinded_signal_region_data_appear_in_no_result(tiny):
    """The observed SR counts (numpy on the ROOT file's arrays) are in no JSON file of the
    blinded run and not in its report; the unblinded run has them (the check can fail)."""
    observed = tiny["observed"]
    for files, present in ((tiny["blinded"], False), (tiny["unblinded"], True)):
        json_files = {
            name: json.loads(text) for name, text in files.items() if name.endswith("json")
        }
        hits = [
            name
            for name, payload in json_files.items()
            for values in _number_lists(payload)
            if _contains_run(values, observed["SR"])
        ]
        assert bool(hits) == present, hits
        cell = f'<td class="num">{int(observed["SR"].sum())}</td>'  # the SR data row's total
        assert (cell in _text(files["report.html"])) == present
        # the control region's data are shown either way
        assert f'<td class="num">{int(observed["CR"].sum())}</td>' in files["report.html"]
    histograms = json.loads(tiny["blinded"]["start/histograms.json"])
    assert "Data" not in histograms["SR"]
    assert histograms["CR"]["Data"]["nominal"]["yields"] == observed["CR"].tolist()


def test_blinded_workspace_holds_the_control_region_fitted_asimov_data(tiny):
    """SR observation = expected yields at mu = 1 (the NormFactor's Nominal) and the other
    parameters fitted to the CR alone: pyhf's fit of the pruned workspace as reference."""
    spec = json.loads(tiny["blinded"]["start/workspace.json"])
    observations = {o["name"]: o["data"] for o in spec["observations"]}
    assert observations["CR"] == tiny["observed"]["CR"].tolist()
    workspace = pyhf.Workspace(spec)
    control = workspace.prune(channels=["SR"])
    cr_model = control.model(poi_name=None)
    names = cr_model.config.par_order
    fixed = cr_model.config.suggested_fixed()
    init = cr_model.config.suggested_init()
    assert "mu" in names  # the signal leaks into the CR: mu is held at 1 there
    fixed[cr_model.config.par_slice("mu").start] = True
    best = pyhf.infer.mle.fit(control.data(cr_model), cr_model, init_pars=init, fixed_params=fixed)
    model = workspace.model()
    pars = np.asarray(model.config.suggested_init(), dtype=float)
    for name in names:
        pars[model.config.par_slice(name)] = best[cr_model.config.par_slice(name)]
    k_bkg = pars[model.config.par_slice("k_bkg")][0]
    assert abs(k_bkg - 1.0) > 0.05  # the CR data pull the background normalisation
    expected = model.expected_actualdata(pars)[model.config.channel_slices["SR"]]
    np.testing.assert_allclose(observations["SR"], expected, rtol=2e-3)


def test_blinded_report_shows_expected_results_only_and_unblinded_the_observed(tiny):
    blinded, unblinded = tiny["blinded"], tiny["unblinded"]
    real = pyhf.Workspace(_real_workspace(blinded["start/workspace.json"], tiny["observed"]["SR"]))
    model = real.model()
    observed_p0, expected_p0 = pyhf.infer.hypotest(
        0.0, real.data(model), model, test_stat="q0", return_expected=True
    )
    significance = json.loads(unblinded["start/significance.json"])
    assert significance["observed"]["p_value"] == pytest.approx(float(observed_p0), rel=2e-2)
    z_observed = significance["observed"]["significance"]
    assert z_observed > significance["expected"]["significance"] + 1  # the data's excess
    text = format_value(z_observed)
    assert f'<td class="num">{text}</td>' in unblinded["report.html"]
    assert "<td>observed significance Z0</td>" in unblinded["report.html"]
    assert "UNBLINDED" in unblinded["report.html"]
    # blinded: the significance of the blinded workspace is an expected one, far from the real
    blinded_significance = json.loads(blinded["start/significance.json"])
    assert abs(blinded_significance["observed"]["significance"] - z_observed) > 1
    page = _text(blinded["report.html"])
    assert text not in page
    labels = ("observed significance Z0", "observed p-value", "observed 95% CLs upper limit")
    assert not [label for label in labels if f"<td>{label}</td>" in page]
    assert "BLINDED: the data of the signal regions (SR) are hidden" in page
    assert "control regions (CR) show their data" in page
    assert page.index("BLINDED") < page.index("<nav>")  # at the top
    # the partial folder: what is there is shown, what is missing is named
    assert "Missing from" in page and "optimize/result.json" in page
    assert "expected significance Z0" in page and "Fit at the start cuts" in page
