# Every plot is `diffana plot KIND INPUT... --out STEM`, which writes STEM.png and STEM.pdf.
PLOTS = f"{RESULTS}/plots"


def figure(stem):
    return multiext(stem, ".png", ".pdf")


# blinded, the signal regions are drawn without data
DISTRIBUTIONS = f"{DIFFANA} plot distributions" + (" --blind" if BLIND else "")
CLS_BLIND = " --blind" if BLIND else ""  # expected CLs only


rule plot_distributions:
    """Stacked pre-fit and post-fit distributions per region, with data (blinded: none in the
    signal regions) and uncertainty band."""
    input:
        workspace=f"{RESULTS}/{{cuts}}/workspace.json",
        fit=f"{RESULTS}/{{cuts}}/fit.json",
        model=MODEL,
    output:
        [figure(f"{PLOTS}/{{cuts}}/{stage}_{region}") for stage in ("prefit", "postfit")
         for region in REGIONS],
    params:
        blinding=BLINDING,
    log:
        f"{RESULTS}/logs/plot_distributions_{{cuts}}.log",
    shell:
        "({DISTRIBUTIONS} {input.workspace} --config {input.model}"
        " --out {PLOTS}/{wildcards.cuts}/prefit"
        " && {DISTRIBUTIONS} {input.workspace} --config {input.model}"
        " --fit {input.fit} --out {PLOTS}/{wildcards.cuts}/postfit) 2> {log}"


rule plot_fit:
    """Nuisance-parameter pulls and the correlation matrix of the fit."""
    input:
        fit=f"{RESULTS}/{{cuts}}/fit.json",
        workspace=f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        figure(f"{PLOTS}/{{cuts}}/pulls"),
        figure(f"{PLOTS}/{{cuts}}/correlation"),
    log:
        f"{RESULTS}/logs/plot_fit_{{cuts}}.log",
    shell:
        "({DIFFANA} plot pulls {input.fit} --workspace {input.workspace}"
        " --out {PLOTS}/{wildcards.cuts}/pulls"
        " && {DIFFANA} plot correlation {input.fit} --out {PLOTS}/{wildcards.cuts}/correlation)"
        " 2> {log}"


rule plot_ranking:
    """Impacts of the nuisance parameters on the POI, with their pulls."""
    input:
        ranking=f"{RESULTS}/{{cuts}}/ranking.json",
        workspace=f"{RESULTS}/{{cuts}}/workspace.json",
    output:
        figure(f"{PLOTS}/{{cuts}}/ranking"),
    log:
        f"{RESULTS}/logs/plot_ranking_{{cuts}}.log",
    shell:
        "{DIFFANA} plot ranking {input.ranking} --workspace {input.workspace}"
        " --out {PLOTS}/{wildcards.cuts}/ranking 2> {log}"


rule plot_scan:
    input:
        f"{RESULTS}/{{cuts}}/scan.json",
    output:
        figure(f"{PLOTS}/{{cuts}}/scan"),
    log:
        f"{RESULTS}/logs/plot_scan_{{cuts}}.log",
    shell:
        "{DIFFANA} plot scan {input} --out {PLOTS}/{wildcards.cuts}/scan 2> {log}"


rule plot_cls:
    """CLs against the POI with the expected band (the Brazil plot); blinded, expected only (the
    observed curve and limit would be those of the Asimov signal-region data)."""
    input:
        limit=f"{RESULTS}/{{cuts}}/limit.json",
        model=MODEL,
    output:
        figure(f"{PLOTS}/{{cuts}}/cls"),
    log:
        f"{RESULTS}/logs/plot_cls_{{cuts}}.log",
    shell:
        "{DIFFANA} plot cls {input.limit} --config {input.model}{CLS_BLIND}"
        " --out {PLOTS}/{wildcards.cuts}/cls 2> {log}"


rule plot_optimization:
    """Optimization history, and soft (KDE) against hard histograms at the optimized cuts."""
    input:
        result=rules.optimize.output.result,
        cuts=rules.optimize.output.cuts,
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
    output:
        figure(f"{PLOTS}/optimization"),
        [figure(f"{PLOTS}/soft_vs_hard_{region}") for region in REGIONS],
    log:
        f"{RESULTS}/logs/plot_optimization.log",
    shell:
        "({DIFFANA} plot optimization {input.result} --config {input.model}"
        " --out {PLOTS}/optimization"
        " && {DIFFANA} plot soft-vs-hard {input.model} --cuts {input.cuts}"
        " --result {input.result} {READ} --out {PLOTS}/soft_vs_hard) 2> {log}"


rule plot_cutflow:
    input:
        rules.cutflow.output,
    output:
        [figure(f"{PLOTS}/cutflow_{region}") for region in REGIONS],
    log:
        f"{RESULTS}/logs/plot_cutflow.log",
    shell:
        "{DIFFANA} plot cutflow {input} --out {PLOTS}/cutflow 2> {log}"


# whether the analysis has shape variations (NormPlusShape systematics) to draw
SHAPES = any(template.variation != "nominal" for template in _analysis.templates())


rule plot_templates:
    """Nominal against up/down templates of every systematic variation, at the optimized cuts
    (only for an analysis with NormPlusShape systematics: see SHAPES)."""
    input:
        histograms=f"{RESULTS}/optimized/histograms.json",
        model=MODEL,
    output:
        directory(f"{PLOTS}/optimized/templates"),
    log:
        f"{RESULTS}/logs/plot_templates.log",
    shell:
        "{DIFFANA} plot templates {input.histograms} --config {input.model}"
        " --out {output}/templates 2> {log}"
