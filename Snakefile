# diffana workflow: generate -> optimize -> histograms/workspaces (starting and optimized cuts)
# -> fits, significance, limits, ranking, POI scan -> cut flow -> plots -> report.html.
# Rules call the `diffana` CLI (and pyhf's, as the independent cross-check); no analysis logic
# lives here. The one exception is blinding (workflows/scripts/blind.py, thin glue over
# analysis/blinding.py). Run from the repository root: `snakemake -c2` (settings in
# workflows/config.yaml; e.g. `--config events=20000 steps=20`). Another working directory works
# too (`snakemake -c2 -s /path/to/Snakefile -d DIR`): inputs and results go under DIR.
#
# `analysis:` is a name in models/ (models/<name>.yaml) or the path of any analysis YAML
# (relative to the working directory); the results go to results/<stem of the YAML>.
#
# Blinding (`unblind: false`, the default): the data of the Signal regions (Regions' Type) never
# reach a result file. Histograms and cut flows lose the data sample in those regions, the
# workspace's signal-region observations are replaced by the Asimov expectation (POI at its
# nominal value, the other parameters fitted to the control regions alone; see
# analysis/blinding.py), so every fit, significance and limit is an expected result, and the
# signal regions' distributions are drawn without data. `--config unblind=true` unblinds.
import json
import os
import shlex
import shutil
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from analysis.blinding import BLINDING_FILE, signal_regions
from analysis.config import load as load_analysis
from analysis.errors import AnalysisError

configfile: os.path.join(workflow.basedir, "workflows", "config.yaml")
# the repository root, for the commands of a profile (workflows/profiles/local-batch), which
# run in the working directory (`-d DIR`) with this process' environment
os.environ["DIFFANA_WORKFLOW"] = workflow.basedir
validate(config, os.path.join(workflow.basedir, "workflows", "schemas", "config.schema.yaml"))


def analysis_yaml(value):
    """The analysis YAML `analysis:` names: models/<value>.yaml for a bare name, else the path
    `value` (relative to the working directory)."""
    if os.path.splitext(value)[1] in (".yaml", ".yml") or "/" in value or os.sep in value:
        path = os.path.abspath(value)
        if not os.path.isfile(path):
            raise WorkflowError(
                f"Error: analysis: {value}: no such file (a path is taken relative to the "
                f"working directory, {os.getcwd()})"
            )
        return path
    path = os.path.join(workflow.basedir, "models", f"{value}.yaml")
    if not os.path.isfile(path):
        names = sorted(n[:-5] for n in os.listdir(os.path.dirname(path)) if n.endswith(".yaml"))
        raise WorkflowError(
            f"Error: analysis: '{value}' is not an analysis in models/ ({', '.join(names)}); "
            "give a name there or the path of an analysis YAML"
        )
    return path


MODEL = analysis_yaml(str(config["analysis"]))
ANALYSIS = os.path.splitext(os.path.basename(MODEL))[0]
RESULTS = f"results/{ANALYSIS}"
DIFFANA = config["diffana"]
# options every diffana command that reads events gets
READ = f"--device {config['device']} --cache-dir {config['cache_dir']}"
# the analysis is validated here, once, before any rule runs (schema, names, expressions)
try:
    _analysis = load_analysis(MODEL)
except AnalysisError as err:
    raise WorkflowError(f"Error: {err}") from None
REGIONS = [region.name for region in _analysis.regions]
# blinded: unblind is false and the analysis has a Signal region
UNBLIND = config["unblind"] in (True, "true")  # `--config unblind=true` gives the string
BLIND = not UNBLIND and bool(signal_regions(_analysis))
BLINDING = "unblinded" if not BLIND else "blinded"  # a param of the rules it changes: a rerun
BLIND_SCRIPT = " ".join(
    shlex.quote(path)
    for path in (sys.executable, os.path.join(workflow.basedir, "workflows", "scripts", "blind.py"))
)
# generate the demo files first when asked, or ("auto") when the analysis reads from data_dir
if config["generate"] == "auto":
    _inputs = os.path.normpath(os.path.dirname(_analysis.general.input_path))
    GENERATE = _inputs == os.path.normpath(config["data_dir"])
else:
    GENERATE = bool(config["generate"])
# "start": the analysis YAML's cut values; "optimized": the cuts `diffana optimize` found
CUTS = ["start", "optimized"]


# Scale-out (README, "Scale-out: the workflow"). `dask:` "" (or null) reads in the rule's
# process; "local" is `--dask` alone (a LocalCluster of DASK_LOCAL_WORKERS processes, started by
# each command); anything else the address of a running scheduler (`--dask ADDRESS`). For the
# rules that read events and fill hard histograms: histograms, workspace, cutflow.
DASK_LOCAL_WORKERS = 2  # analysis.dask_histograms.LOCAL_WORKERS (not imported: torch, ~4 s)
if not config["dask"]:
    DASK, DASK_THREADS = "", 1
else:
    _address = "" if config["dask"] == "local" else f" {shlex.quote(config['dask'])}"
    DASK = f"--dask{_address} --dask-partition-size {config['dask_partition_size']}"
    DASK_THREADS = DASK_LOCAL_WORKERS if config["dask"] == "local" else 1


def torchrun_executable():
    """The `torchrun` of the Python environment that runs `diffana`: next to the `diffana`
    command (a venv's bin, also through a symlink), else next to Snakemake's Python, else the
    first on PATH."""
    command = shutil.which(shlex.split(DIFFANA)[0])
    commands = [command, os.path.realpath(command)] if command else []
    for folder in [*map(os.path.dirname, commands), os.path.dirname(sys.executable)]:
        candidate = os.path.join(folder, "torchrun")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("torchrun")
    if found is None:
        raise WorkflowError(
            f"Error: optimize_processes: {config['optimize_processes']} needs torchrun (PyTorch), "
            f"found neither next to {DIFFANA!r} nor on PATH"
        )
    return found


# `optimize_processes:` N > 1 runs `diffana optimize --distributed` as N torchrun processes on
# this node (--standalone: a free rendezvous port per run), sharding the events; the result
# equals the one-process run's up to the order of additions (analysis/distributed.py)
OPTIMIZE_PROCESSES = config["optimize_processes"]
if OPTIMIZE_PROCESSES > 1:
    OPTIMIZE = (
        f"{shlex.quote(torchrun_executable())} --standalone --nproc-per-node {OPTIMIZE_PROCESSES}"
        f" --no-python {DIFFANA} optimize"
    )
    DISTRIBUTED = " --distributed"
else:
    OPTIMIZE, DISTRIBUTED = f"{DIFFANA} optimize", ""


def json_output(command, step, output):
    """Shell text running the diffana `command` so that its JSON goes to `output` (a
    placeholder such as "{output.workspace}"); blinded, through `blind.py step` (a pipe: the
    unblinded numbers are never written)."""
    if BLIND:
        return f"{command} | {BLIND_SCRIPT} {step} {{input.model}} --output {output}"
    return f"{command} --output {output}"


wildcard_constraints:
    cuts="start|optimized",

include: "workflows/rules/generate.smk"
include: "workflows/rules/optimize.smk"
include: "workflows/rules/workspace.smk"
include: "workflows/rules/fit.smk"
include: "workflows/rules/plots.smk"
include: "workflows/rules/report.smk"
include: "workflows/rules/notebook.smk"


rule all:
    input:
        f"{RESULTS}/report.html",
