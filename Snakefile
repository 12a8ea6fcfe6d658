# diffana workflow: generate -> optimize -> histograms/workspaces (starting and optimized cuts)
# -> fits, significance, limits, ranking, POI scan -> cut flow -> plots -> report.html.
# Rules only call the `diffana` CLI (and pyhf's, as the independent cross-check); no analysis
# logic lives here. Run from the repository root: `snakemake -c2` (settings in
# workflows/config.yaml; e.g. `--config events=20000 steps=20`). Another working directory works
# too (`snakemake -c2 -s /path/to/Snakefile -d DIR`): the analysis YAMLs are taken from this
# repository, inputs and results go under DIR.
import json
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from analysis.config import load as load_analysis
from analysis.errors import AnalysisError

configfile: os.path.join(workflow.basedir, "workflows", "config.yaml")
validate(config, os.path.join(workflow.basedir, "workflows", "schemas", "config.schema.yaml"))

ANALYSIS = config["analysis"]
MODEL = os.path.join(workflow.basedir, "models", f"{ANALYSIS}.yaml")
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
# generate the demo files first when asked, or ("auto") when the analysis reads from data_dir
if config["generate"] == "auto":
    _inputs = os.path.normpath(os.path.dirname(_analysis.general.input_path))
    GENERATE = _inputs == os.path.normpath(config["data_dir"])
else:
    GENERATE = bool(config["generate"])
# "start": the analysis YAML's cut values; "optimized": the cuts `diffana optimize` found
CUTS = ["start", "optimized"]

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
