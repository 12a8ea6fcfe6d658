rule workspace:
    """Hard histograms and the pyhf JSON workspace of the analysis."""
    input:
        model=MODEL,
        data=rules.generate.output if config["generate"] else [],
    output:
        workspace=f"{RESULTS}/workspace.json",
        histograms=f"{RESULTS}/histograms.json",
    params:
        device=config["device"],
        cache=config["cache_dir"],
    log:
        f"{RESULTS}/logs/workspace.log",
    shell:
        "({DIFFANA} histograms {input.model} --device {params.device} --cache-dir {params.cache}"
        " --output {output.histograms} -v"
        " && {DIFFANA} workspace {input.model} --device {params.device} --cache-dir {params.cache}"
        " --output {output.workspace} -v) 2> {log}"
