rule optimize:
    """Gradient-descent optimization of the trainable cuts (result.json, cuts.json)."""
    input:
        model=MODEL,
        data=rules.generate.output if GENERATE else [],
    output:
        result=f"{RESULTS}/optimize/result.json",
        cuts=f"{RESULTS}/optimize/cuts.json",
    params:
        steps=f"--steps {config['steps']}" if config["steps"] else "",
    log:
        f"{RESULTS}/logs/optimize.log",
    shell:
        "{DIFFANA} optimize {input.model} {READ} {params.steps} --out {RESULTS}/optimize"
        " --output {RESULTS}/logs/optimize.json -v 2> {log}"
