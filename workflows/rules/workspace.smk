def cuts_file(wildcards):
    """The cuts.json a rule reads: none for the starting cuts, the optimized ones otherwise."""
    return [] if wildcards.cuts == "start" else rules.optimize.output.cuts


def cuts_option(wildcards, input):
    return f"--cuts {input.cuts}" if input.cuts else ""


rule workspace:
    """Hard histograms and the pyhf JSON workspace at the starting or the optimized cuts."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
        cuts=cuts_file,
    output:
        workspace=f"{RESULTS}/{{cuts}}/workspace.json",
        histograms=f"{RESULTS}/{{cuts}}/histograms.json",
    params:
        cuts=cuts_option,
    log:
        f"{RESULTS}/logs/workspace_{{cuts}}.log",
    shell:
        "({DIFFANA} histograms {input.model} {params.cuts} {READ} --output {output.histograms} -v"
        " && {DIFFANA} workspace {input.model} {params.cuts} {READ}"
        " --output {output.workspace} -v) 2> {log}"


rule cutflow:
    """Hard cut flow (events and weighted yields after each cut), starting and optimized cuts."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
        cuts=rules.optimize.output.cuts,
    output:
        f"{RESULTS}/cutflow.json",
    log:
        f"{RESULTS}/logs/cutflow.log",
    shell:
        "{DIFFANA} cutflow {input.model} --cuts {input.cuts} {READ} --output {output} -v 2> {log}"
