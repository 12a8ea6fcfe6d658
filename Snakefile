# diffana workflow: generate -> workspace -> fit. Rules call the `diffana` CLI (and pyhf's);
# no analysis logic lives here. Run from the repository root: `snakemake -c2`.
# Another working directory works too (`snakemake -c2 -s /path/to/Snakefile -d DIR`): the
# analysis YAMLs are taken from this repository, inputs and results go under DIR.
import os

from snakemake.utils import validate

configfile: os.path.join(workflow.basedir, "workflows", "config.yaml")
validate(config, os.path.join(workflow.basedir, "workflows", "schemas", "config.schema.yaml"))

ANALYSIS = config["analysis"]
MODEL = os.path.join(workflow.basedir, "models", f"{ANALYSIS}.yaml")
RESULTS = f"results/{ANALYSIS}"
DIFFANA = config["diffana"]

include: "workflows/rules/generate.smk"
include: "workflows/rules/workspace.smk"
include: "workflows/rules/fit.smk"


rule all:
    input:
        f"{RESULTS}/workspace.json",
        f"{RESULTS}/fit.json",
