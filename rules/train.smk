# RL training: an 8-node job (submitit -> Ray -> slime, or the local trainer).


rule train_run:
    input:
        unpack(rollout_inputs),
        hf=hf_manifest(),
        torch_dist=WF.torch_dist_dir / SENTINEL,
        data=[WF.dataset_path(n) for n in WF.preset.datasets],
    output:
        done=WF.run_dir("{run}") / SENTINEL,
        # Checkpoints, metrics.jsonl and trainer settings carry resume state: never declared.
        plot=report(WF.run_dir("{run}") / "train_curves.png", category="training", caption="report/train_curves.rst"),
    params:
        key=lambda wc: staleness.train(WF, wc.run),
    conda:
        "../envs/cpu.yaml"
    log:
        LOGS / "train.{run}.log",
    wildcard_constraints:
        run="|".join(WF.runs),
    localrule: True  # blocks here while submitit holds the multi-node allocation
    shell:
        "glmsnake step train --sentinel {output.done} --run {wildcards.run} > {log} 2>&1"


rule train:
    input:
        expand(WF.run_dir("{run}") / SENTINEL, run=list(WF.runs)),
