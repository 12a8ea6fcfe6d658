rule fit:
    """Maximum-likelihood fit of the workspace with pyhf (the independent reference)."""
    input:
        f"{RESULTS}/workspace.json",
    output:
        f"{RESULTS}/fit.json",
    log:
        f"{RESULTS}/logs/fit.log",
    shell:
        "pyhf fit --output-file {output} {input} 2> {log}"
