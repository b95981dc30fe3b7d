# HF weights and prompt data: download (or generate, or record) and verify.


rule download_hf:
    output:
        manifest=PATHS.hf_manifest,
    params:
        key=staleness.weights(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("download_hf"),
    resources:
        **slurm_resources(),
    shell:
        "glmsnake step download-hf --sentinel {output.manifest:q} > {log:q} 2>&1"


rule download_dataset:
    output:
        data=PATHS.dataset("{name}"),
    params:
        key=lambda wc: staleness.dataset(WF, wc.name),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("download_dataset", "{name}"),
    resources:
        **slurm_resources(),
    wildcard_constraints:
        name="|".join(WF.preset.datasets),
    shell:
        "glmsnake step download-dataset --output {output.data:q} --name {wildcards.name:q} > {log:q} 2>&1"


rule weights:
    input:
        hf=PATHS.hf_manifest,
        data=[PATHS.dataset(n) for n in WF.preset.datasets],
