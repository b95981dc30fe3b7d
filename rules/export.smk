# The trained checkpoint back to an HF folder that transformers and SGLang load.


rule export_hf:
    input:
        trained=PATHS.run("{run}").sentinel,
    output:
        done=PATHS.run("{run}").hf_sentinel,
    params:
        key=lambda wc: staleness.export_hf(WF, wc.run),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("export_hf", "{run}"),
    wildcard_constraints:
        run=RUNS,
    localrule: WF.preset.export.backend == "slime"  # then it blocks here while submitit holds its node
    resources:
        **slurm_resources(),
    shell:
        "glmsnake step export-hf --sentinel {output.done:q} --run {wildcards.run:q} > {log:q} 2>&1"
