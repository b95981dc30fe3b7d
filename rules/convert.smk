# HF -> Megatron torch_dist (a multi-node job) and HF -> block FP8 (one node).


rule convert_torch_dist:
    input:
        hf=PATHS.hf_manifest,
    output:
        done=PATHS.torch_dist_sentinel,
    params:
        key=staleness.torch_dist(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("convert_torch_dist"),
    localrule: True  # blocks here while submitit holds the multi-node allocation
    shell:
        "glmsnake step convert-torch-dist --sentinel {output.done:q} > {log:q} 2>&1"


rule convert_fp8:
    input:
        hf=PATHS.hf_manifest,
    output:
        done=PATHS.fp8_sentinel,
    params:
        key=staleness.fp8(WF),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("convert_fp8"),
    threads: WF.preset.convert.fp8.workers
    resources:
        **slurm_resources(),
        gpu=1 if WF.preset.convert.fp8.device != "cpu" else 0,
    shell:
        "glmsnake step convert-fp8 --sentinel {output.done:q} > {log:q} 2>&1"


rule torch_dist:
    input:
        rules.convert_torch_dist.output.done,


rule fp8:
    input:
        rules.convert_fp8.output.done,
