# HF -> Megatron torch_dist (a 2-node job) and HF -> block FP8 (one node).


rule convert_torch_dist:
    input:
        hf=hf_manifest(),
    output:
        done=WF.torch_dist_dir / SENTINEL,
    params:
        key=staleness.torch_dist(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "convert_torch_dist.log",
    localrule: True  # blocks here while submitit holds the multi-node allocation
    shell:
        "glmsnake step convert-torch-dist --sentinel {output.done} > {log} 2>&1"


rule convert_fp8:
    input:
        hf=hf_manifest(),
    output:
        done=WF.fp8_dir / SENTINEL,
    params:
        key=staleness.fp8(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "convert_fp8.log",
    threads: WF.preset.convert.fp8.workers
    resources:
        **slurm_resources(),
        gpu=1 if WF.preset.convert.fp8.device != "cpu" else 0,
    shell:
        "glmsnake step convert-fp8 --sentinel {output.done} > {log} 2>&1"


rule torch_dist:
    input:
        rules.convert_torch_dist.output.done,


rule fp8:
    input:
        rules.convert_fp8.output.done,
