# The trained checkpoint back to an HF folder that transformers and SGLang load.


rule export_hf:
    input:
        trained=WF.run_dir("{run}") / SENTINEL,
    output:
        done=WF.run_dir("{run}") / "hf" / SENTINEL,
    params:
        key=lambda wc: staleness.export_hf(WF, wc.run),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "export_hf.{run}.log",
    wildcard_constraints:
        run="|".join(WF.runs),
    resources:
        **slurm_resources(),
    shell:
        "glmsnake step export-hf --sentinel {output.done} --run {wildcards.run} > {log} 2>&1"
