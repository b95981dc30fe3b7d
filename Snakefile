# glmsnake: GLM-4.7 RL with slime, as a Snakemake workflow.
#   snakemake --profile profiles/local train     # the embedded tiny default, on this machine
#   snakemake --profile slurm train              # on a Slurm cluster (see README)
# Outputs Snakemake tracks are small sentinels; checkpoint folders are never
# declared outputs, so Snakemake never deletes them (design section 1).

from snakemake.utils import min_version, validate

min_version("9.20")

import json
import os

from glmsnake import config as glmconfig
from glmsnake import staleness
from glmsnake.steps import CONFIG_ENV

configfile: "config/config.yaml"

validate(config, "config/config.schema.json")  # exported from glmsnake.config (`glmsnake schema`)
WF = glmconfig.load(config)
# Steps resolve the same config from here, on this host and on Slurm nodes alike.
os.environ[CONFIG_ENV] = json.dumps(config)
SENTINEL = "glmsnake.done.json"
LOGS = WF.base / "logs"


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/convert.smk"
include: "rules/train.smk"
include: "rules/export.smk"


rule all:
    input:
        rules.weights.input,
        rules.torch_dist.input,
        rules.fp8.input,  # built even without FP8 rollout: SGLang serves it, and it is checked here
        rules.train.input,
        expand(WF.run_dir("{run}") / "hf" / SENTINEL, run=list(WF.runs)),
    default_target: True
