def cuts_file(wildcards):
    """The cuts.json a rule reads: none for the starting cuts, the optimized ones otherwise."""
    return [] if wildcards.cuts == "start" else rules.optimize.output.cuts


def cuts_option(wildcards, input):
    return f"--cuts {input.cuts}" if input.cuts else ""


rule workspace:
    """Hard histograms and the pyhf JSON workspace at the starting or the optimized cuts
    (blinded: without the signal regions' data; Asimov data there in the workspace)."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
        cuts=cuts_file,
    output:
        workspace=f"{RESULTS}/{{cuts}}/workspace.json",
        histograms=f"{RESULTS}/{{cuts}}/histograms.json",
    params:
        cuts=cuts_option,
        blinding=BLINDING,
    log:
        f"{RESULTS}/logs/workspace_{{cuts}}.log",
    threads: DASK_THREADS  # dask: local starts DASK_LOCAL_WORKERS worker processes
    shell:
        "("
        + json_output(
            "{DIFFANA} histograms {input.model} {params.cuts} {READ} {DASK} -v",
            "histograms",
            "{output.histograms}",
        )
        + " && "
        + json_output(
            "{DIFFANA} workspace {input.model} {params.cuts} {READ} {DASK} -v",
            "workspace",
            "{output.workspace}",
        )
        + ") 2> {log}"


rule cutflow:
    """Hard cut flow (events and weighted yields after each cut), starting and optimized cuts
    (blinded: without the signal regions' data)."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
        cuts=rules.optimize.output.cuts,
    output:
        f"{RESULTS}/cutflow.json",
    params:
        blinding=BLINDING,
    log:
        f"{RESULTS}/logs/cutflow.log",
    threads: DASK_THREADS
    shell:
        "("
        + json_output(
            "{DIFFANA} cutflow {input.model} --cuts {input.cuts} {READ} {DASK} -v",
            "cutflow",
            "{output}",
        )
        + ") 2> {log}"


localrules:
    blinding,


rule blinding:
    """Whether the results are blinded, and which regions (read by the report)."""
    input:
        model=MODEL,
    output:
        f"{RESULTS}/{BLINDING_FILE}",
    params:
        unblind="--unblind" if UNBLIND else "",
        blinding=BLINDING,
    shell:
        "{BLIND_SCRIPT} record {input.model} {params.unblind} --output {output}"
