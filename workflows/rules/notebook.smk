rule tuning:
    """The tuning notebook (workflows/notebooks/tuning.ipynb) as a Snakemake notebook rule; not
    part of `all`: `snakemake -c2 tuning`. The executed notebook, with its plots, is the log."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
    output:
        cuts=f"{RESULTS}/tuning/cuts.json",
    params:
        steps=config["steps"] or 50,
        device=config["device"],
    log:
        notebook=f"{RESULTS}/logs/tuning.ipynb",
    notebook:
        "../notebooks/tuning.ipynb"
