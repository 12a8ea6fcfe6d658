rule report:
    """One self-contained HTML file: summary, results before and after optimization, every plot
    and table, software versions and the configuration."""
    input:
        model=MODEL,
        optimize=rules.optimize.output.result,
        cutflow=rules.cutflow.output,
        results=expand(
            f"{RESULTS}/{{cuts}}/{{name}}.json",
            cuts=CUTS,
            name=["fit", "pyhf_fit", "significance", "limit", "ranking", "scan", "histograms"],
        ),
        plots=rules.plot_optimization.output,
        templates=rules.plot_templates.output if SHAPES else [],
        blinding=rules.blinding.output,
        more_plots=[
            rules.plot_cutflow.output,
            expand(
                f"{PLOTS}/{{cuts}}/{{name}}.png",
                cuts=CUTS,
                name=["pulls", "correlation", "ranking", "scan", "cls"]
                + [f"{stage}_{region}" for stage in ("prefit", "postfit") for region in REGIONS],
            ),
        ],
    output:
        f"{RESULTS}/report.html",
    log:
        f"{RESULTS}/logs/report.log",
    params:
        unblind="--unblind" if UNBLIND else "",
    shell:
        "{DIFFANA} report {RESULTS} --config {input.model} {params.unblind} --output {output}"
        " -v 2> {log}"
