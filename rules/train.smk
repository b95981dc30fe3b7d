# RL training: a multi-node job (submitit -> Ray -> slime, or the local trainer).


rule train_run:
    input:
        unpack(rollout_inputs),
        hf=PATHS.hf_manifest,
        torch_dist=PATHS.torch_dist_sentinel,
        data=[PATHS.dataset(n) for n in WF.preset.datasets],
    output:
        done=PATHS.run("{run}").sentinel,
        # Checkpoints, metrics.jsonl and trainer settings carry resume state: never declared.
        plot=report(PATHS.run("{run}").plot, category="training", caption="report/train_curves.rst"),
    params:
        key=lambda wc: staleness.train(WF, wc.run),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("train", "{run}"),
    wildcard_constraints:
        run=RUNS,
    localrule: True  # blocks here while submitit holds the multi-node allocation
    shell:
        "glmsnake step train --sentinel {output.done:q} --run {wildcards.run:q} > {log:q} 2>&1"


rule train:
    input:
        [PATHS.run(run).sentinel for run in WF.runs],
