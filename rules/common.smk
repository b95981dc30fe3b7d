# Helpers shared by the rules: paths and resources, all from the validated config (WF).


def slurm_resources(alloc=None):
    """Resources the slurm executor plugin reads; None values are left out."""
    s = WF.user.slurm
    res = {
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
    }
    if alloc is not None:
        res.update(runtime=alloc.time_min, cpus_per_task=alloc.cpus_per_task, nodes=alloc.nodes)
    return {k: v for k, v in res.items() if v is not None}


def hf_manifest():
    return WF.hf_dir / "glmsnake.manifest.json"


def rollout_inputs(wildcards):
    run = WF.runs[wildcards.run]
    return {"fp8": WF.fp8_dir / SENTINEL} if run.features.fp8_rollout else {}
