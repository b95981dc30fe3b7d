"""Config -> slime's argument groups, the driver command and its runtime environment.

The order and grouping follow slime's run scripts, so a rendered recipe reads
like `scripts/run-glm4.7-355B-A32B.sh`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from glmsnake.launch.driver import HEAD_ADDRESS, NVLS, Driver, at_head
from glmsnake.recipe.args import SglangArgs

if TYPE_CHECKING:
    from glmsnake.config import Run, Workflow

TRAIN_PY = ("python3", "train.py")
GROUP_ORDER = ("MODEL", "CKPT", "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "SGLANG", "MTP", "MISC", "WANDB")


def sglang_args(run: "Run") -> SglangArgs:
    """SGLang args with the toggles applied: MTP speculative decoding, then the FP8/DeepEP overlay."""
    merged = run.sglang.model_dump(exclude_unset=True)
    if run.features.mtp_speculative_decoding and run.sglang_speculative is not None:
        merged.update(run.sglang_speculative.model_dump(exclude_unset=True))
    if run.features.fp8_rollout and run.sglang_fp8 is not None:
        merged.update(run.sglang_fp8.model_dump(exclude_unset=True))
    return SglangArgs.model_validate(merged)


def rollout_checkpoint(wf: "Workflow", run: "Run") -> Path:
    """The HF folder SGLang serves: the FP8 conversion when FP8 rollout is on."""
    return wf.paths.fp8_dir if run.serves_fp8 else wf.paths.hf_dir


def model_args(wf: "Workflow", run: "Run | None" = None) -> list[str]:
    args = wf.preset.model.render()
    if run is not None and not run.features.mtp_training:
        # Megatron loads the MTP layer only to train it (slime's scripts: --mtp-num-layers sits with
        # MTP_ARGS); speculative decoding drafts with the HF checkpoint's MTP layer inside SGLang.
        args = _drop(args, "--mtp-num-layers")
    return args


def _drop(args: list[str], flag: str) -> list[str]:
    """`args` without `flag` and its values."""
    if flag not in args:
        return args
    i = args.index(flag)
    return args[:i] + args[_values_end(args, i) :]


def _after(args: list[str], flag: str, extra: list[str]) -> list[str]:
    """`extra` inserted after `flag` and its values (at the front when `flag` is not there)."""
    if flag not in args:
        return extra + args
    end = _values_end(args, args.index(flag))
    return args[:end] + extra + args[end:]


def _values_end(args: list[str], i: int) -> int:
    """The index just past the flag at `i` and the values that follow it."""
    j = i + 1
    while j < len(args) and not args[j].startswith("--"):
        j += 1
    return j


def groups(wf: "Workflow", run_name: str) -> dict[str, list[str]]:
    """Every argument group of slime's train.py for one run, in slime's order."""
    run = wf.runs[run_name]
    paths = wf.paths
    ckpt = paths.run(run_name).checkpoints
    rollout = ["--prompt-data", str(paths.dataset(wf.preset.prompt_dataset)), *run.rollout.render()]
    eval_ = run.eval.render()
    if wf.preset.eval_datasets:
        # slime's scripts name the eval sets right after the interval: `--eval-prompt-data NAME PATH ...`.
        named = [x for name in wf.preset.eval_datasets for x in (name, str(paths.dataset(name)))]
        eval_ = _after(eval_, "--eval-interval", ["--eval-prompt-data", *named])
    return {
        "MODEL": model_args(wf, run),
        "CKPT": [
            "--hf-checkpoint", str(rollout_checkpoint(wf, run)),
            "--ref-load", str(paths.torch_dist_dir),
            "--load", str(ckpt),
            "--save", str(ckpt),
            "--save-interval", str(run.train.save_interval),
        ],
        "ROLLOUT": rollout,
        "EVAL": eval_,
        "PERF": run.perf.render(),
        "GRPO": run.grpo.render(),
        "OPTIMIZER": run.optimizer.render(),
        "SGLANG": sglang_args(run).render(),
        "MTP": run.mtp.render() if run.features.mtp_training else [],
        "MISC": run.misc.render(),
        "WANDB": tracking_args(wf, run_name),
    }


def wandb_run_id(wf: "Workflow", run_name: str) -> str:
    """The same W&B run for every attempt of a run (requeues, resumes, a longer num_rollout);
    a new one when settings change what the run computes (it restarts from the weights)."""
    import hashlib
    import json
    import re

    from glmsnake import staleness

    key = staleness.train(wf, run_name)
    key["rollout"].pop("num_rollout", None)  # a longer or shorter run continues its curve
    digest = hashlib.sha256(json.dumps([wf.preset.model_name, run_name, key], sort_keys=True).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)[:40]}-{digest[:12]}"


def tracking_args(wf: "Workflow", run_name: str) -> list[str]:
    """slime's W&B/TensorBoard flags, with a stable run id and the run folder as their home."""
    t, rp = wf.runs[run_name].tracking, wf.paths.run(run_name)
    extra = {}
    if t.use_wandb:
        extra = {"wandb_group": t.wandb_group or run_name}
    if t.use_tensorboard:
        extra |= {"tb_project_name": t.tb_project_name or wf.preset.model_name,
                  "tb_experiment_name": t.tb_experiment_name or run_name}
    args = t.model_copy(update=extra).render()
    if t.use_wandb:
        args += ["--wandb-run-id", wandb_run_id(wf, run_name), "--disable-wandb-random-suffix",
                 "--wandb-dir", str(rp.wandb)]
    return args


def tracking_env(wf: "Workflow", run_name: str) -> dict[str, str]:
    """What W&B and TensorBoard read from the environment: slime's primary W&B process takes its
    run id from WANDB_RUN_ID (it passes none to wandb.init), TensorBoard writes to TENSORBOARD_DIR.
    WANDB_API_KEY is not here: every Ray process inherits it from the job's environment."""
    t, rp = wf.runs[run_name].tracking, wf.paths.run(run_name)
    env = {}
    if t.use_wandb:
        env |= {"WANDB_RUN_ID": wandb_run_id(wf, run_name), "WANDB_RESUME": "allow"}
    if t.use_tensorboard:
        env["TENSORBOARD_DIR"] = str(rp.tensorboard)
    return env


def placement_args(run: "Run") -> list[str]:
    """train.py's own arguments before the groups: where the actors go."""
    alloc = run.train.allocation
    args = ["--actor-num-nodes", str(alloc.nodes), "--actor-num-gpus-per-node", str(alloc.gpus_per_node)]
    return args + (["--colocate"] if run.train.colocate else [])


def driver(wf: "Workflow", run_name: str, head_address: str, interface: str | None = None,
           nvls: str = "0") -> Driver:
    """slime's `train.py` command and its runtime env, as slime's run scripts set them."""
    run = wf.runs[run_name]
    argv = [*TRAIN_PY, *placement_args(run)]
    for args in groups(wf, run_name).values():
        argv += args
    env = runtime_env(run, head_address, interface, nvls) | tracking_env(wf, run_name)
    return Driver(argv=argv, cwd=run.train.slime_dir, env=env)


def driver_factory(wf: "Workflow", run_name: str, interface: str | None = None) -> functools.partial[Driver]:
    """`driver` as run_ray_job's driver_factory: rendered now, from the config, as plain data (it
    crosses into the tasks, i.e. the container); the head fills in its address."""
    return functools.partial(at_head, driver(wf, run_name, HEAD_ADDRESS, interface, NVLS))


def runtime_env(run: "Run", head_address: str, interface: str | None = None, nvls: str = "0") -> dict[str, str]:
    env = {
        "no_proxy": f"localhost,127.0.0.1,{head_address}",
        "NO_PROXY": f"localhost,127.0.0.1,{head_address}",
        "MASTER_ADDR": head_address,
        "PYTHONPATH": run.train.megatron_dir,
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "NVSHMEM_DISABLE_NCCL": "1",
        # NVLS needs NVLink: 1 where nvidia-smi's topology shows NVLink on every node (preflight
        # decides it on the allocation; slime's scripts count `NV<n>` in `nvidia-smi topo -m`).
        "NCCL_NVLS_ENABLE": nvls,
    }
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
        env["TP_SOCKET_IFNAME"] = interface
        env["NCCL_SOCKET_IFNAME"] = interface
    return env


def render_text(wf: "Workflow", run_name: str) -> str:
    """The recipe as slime's scripts write it: one bash array per group, then the driver."""
    lines = []
    for name, args in groups(wf, run_name).items():
        lines.append(f"{name}_ARGS=(")
        lines += [f"   {a}" for a in _pair(args)]
        lines.append(")")
        lines.append("")
    run = wf.runs[run_name]
    env = runtime_env(run, head_address="${MASTER_ADDR}", nvls="${HAS_NVLINK}") | tracking_env(wf, run_name)
    lines.append("# runtime env: " + " ".join(f"{k}={v}" for k, v in env.items()))
    lines.append(f"cd {_quote(run.train.slime_dir)} && " + " ".join([*TRAIN_PY, *placement_args(run)])
                 + " " + " ".join(f'"${{{g}_ARGS[@]}}"' for g in GROUP_ORDER))
    return "\n".join(lines)


def _pair(args: list[str]) -> list[str]:
    """Join each flag with its values for display: `--lr 1e-06`."""
    out: list[str] = []
    for a in args:
        if a.startswith("--") or not out:
            out.append(a)
        else:
            out[-1] += " " + _quote(a)
    return out


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)
