# glmsnake: GLM-4.7 RL with slime, as a Snakemake workflow.
#   snakemake --profile profiles/local train     # the embedded tiny default, on this machine
#   snakemake --profile slurm train              # on a Slurm cluster (see README)
# Outputs Snakemake tracks are small sentinels; checkpoint folders are never declared
# outputs, so Snakemake never deletes them (docs/architecture.md, "Files under base_dir").

from snakemake.utils import min_version, validate

min_version("9.20")

from glmsnake import base_lock, disk, resolve, staleness
from glmsnake.errors import refused_without_traceback


resolve.check_yaml_file("config/config.yaml")  # Snakemake's own YAML error names no file or line


configfile: "config/config.yaml"


# Every check that needs no GPU, all problems at once, each with its fix; a mistake exits here,
# before any job. Steps resolve the same config from the environment, on this host and on nodes.
WF = resolve.for_snakefile(config, workflow.configfiles)
validate(config, "config/config.schema.json")  # exported from glmsnake.config (`glmsnake schema`)
PATHS = WF.paths


onstart:
    # Only a run that executes jobs (not a dry run, not a job on a node) needs room under
    # base_dir for what its jobs write (checkpoints included), and holds base_dir.
    with refused_without_traceback():
        resolve.check_base_dir_room(WF, workflow.dag.needrun_jobs())
    base_lock.acquire(WF.base)


onerror:
    disk.report_if_full(WF.base)  # a full disk also leaves the failed step's log empty


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/convert.smk"
include: "rules/train.smk"
include: "rules/export.smk"
include: "rules/report.smk"


rule all:
    input:
        rules.weights.input,
        rules.torch_dist.input,
        rules.fp8.input,  # built even without FP8 rollout: SGLang serves it, and it is checked here
        rules.train.input,
        [PATHS.run(run).hf_sentinel for run in WF.runs],
        PATHS.provenance,  # `snakemake --report report.html` shows it beside the training curves
    default_target: True
