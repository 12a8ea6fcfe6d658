rule optimize:
    """Gradient-descent optimization of the trainable cuts (result.json, cuts.json); with
    optimize_processes N > 1, N torchrun processes each holding a share of the events."""
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
    threads: OPTIMIZE_PROCESSES  # one core per torchrun process (optimize_processes)
    shell:
        "{OPTIMIZE} {input.model} {READ}{DISTRIBUTED} {params.steps} --out {RESULTS}/optimize"
        " --output {RESULTS}/logs/optimize.json -v 2> {log}"
