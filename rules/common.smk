# Helpers shared by the rules, all from the validated config (WF) and its paths (PATHS).


def slurm_resources():
    """Resources the slurm executor plugin reads; None values are left out."""
    s = WF.user.slurm
    res = {
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
    }
    return {k: v for k, v in res.items() if v is not None}


def rollout_inputs(wildcards):
    return {"fp8": PATHS.fp8_sentinel} if WF.runs[wildcards.run].serves_fp8 else {}


RUNS = "|".join(WF.runs)
