rule fit:
    """Maximum-likelihood fit of a workspace (MIGRAD/HESSE, diffana's likelihood)."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/fit.json",
    log:
        f"{RESULTS}/logs/fit_{{cuts}}.log",
    shell:
        "{DIFFANA} fit {input} --device {config[device]} --output {output} -v 2> {log}"


rule pyhf_fit:
    """The same fit with pyhf: the independent cross-check shown in the report."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/pyhf_fit.json",
    log:
        f"{RESULTS}/logs/pyhf_fit_{{cuts}}.log",
    shell:
        "pyhf fit --output-file {output} {input} 2> {log}"


rule significance:
    """Observed and expected discovery significance (asymptotic, q0)."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/significance.json",
    log:
        f"{RESULTS}/logs/significance_{{cuts}}.log",
    shell:
        "{DIFFANA} significance {input} --device {config[device]} --output {output} -v 2> {log}"


rule limit:
    """Observed and expected 95% CLs upper limits, with CLs on a POI grid (Brazil plot)."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/limit.json",
    log:
        f"{RESULTS}/logs/limit_{{cuts}}.log",
    shell:
        "{DIFFANA} limit {input} --device {config[device]} --output {output} -v 2> {log}"


rule ranking:
    """Impact of each nuisance parameter on the POI (pre- and post-fit)."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/ranking.json",
    log:
        f"{RESULTS}/logs/ranking_{{cuts}}.log",
    shell:
        "{DIFFANA} ranking {input} --device {config[device]} --output {output} -v 2> {log}"


rule poi_scan:
    """Profile-likelihood scan of the POI."""
    input:
        f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        f"{RESULTS}/{{cuts}}/scan.json",
    params:
        poi=lambda wildcards, input: json.load(open(input[0]))["measurements"][0]["config"]["poi"],
    log:
        f"{RESULTS}/logs/scan_{{cuts}}.log",
    shell:
        "{DIFFANA} scan {input} --parameter {params.poi} --steps 21 --device {config[device]}"
        " --output {output} -v 2> {log}"
