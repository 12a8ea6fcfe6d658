GENERATED = ["signal", "drell_yan", "ttbar", "multijet", "data"]


rule generate:
    """Generate the demo ROOT files (MC samples with systematic trees, and pseudo-data)."""
    output:
        expand("{data_dir}/{name}.root", data_dir=config["data_dir"], name=GENERATED),
    params:
        out=config["data_dir"],
        events=config["events"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/generate.log",
    shell:
        "{DIFFANA} generate --out {params.out} --events {params.events} --seed {params.seed}"
        " --output {RESULTS}/generated.json 2> {log}"
