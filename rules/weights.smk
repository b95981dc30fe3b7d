# HF weights and prompt data: download (or generate, or record) and verify.


rule download_hf:
    output:
        manifest=hf_manifest(),
    params:
        key=staleness.weights(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "download_hf.log",
    resources:
        **slurm_resources(),
    shell:
        "glmsnake step download-hf --sentinel {output.manifest} > {log} 2>&1"


rule download_dataset:
    output:
        data=WF.base / "data" / "{name}.jsonl",
    params:
        key=lambda wc: staleness.dataset(WF, wc.name),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "download_dataset.{name}.log",
    resources:
        **slurm_resources(),
    wildcard_constraints:
        name="|".join(WF.preset.datasets),
    shell:
        "glmsnake step download-dataset --sentinel {output.data} --name {wildcards.name} > {log} 2>&1"


rule weights:
    input:
        hf=hf_manifest(),
        data=[WF.dataset_path(n) for n in WF.preset.datasets],
