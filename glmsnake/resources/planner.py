"""Will it fit? Every run's estimates against the preset's hardware, with the change that makes it fit.

Budgets: each training GPU (per pipeline stage), each rollout GPU (SGLang's weights inside
`mem_fraction_static`, and one full-length request in its KV cache), each node's host memory, and
base_dir's disk (free space now, and the quota if one is set). Over a budget is an error, above
90% a warning. A fix is never guessed: each candidate change (full recompute, CPU offload, more
pipeline stages, fewer tokens per GPU, ...) is applied to the run, checked by the layout rules,
estimated again, and named only if the result fits.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from glmsnake import disk
from glmsnake.resources import host, rollout, storage, timing, training
from glmsnake.resources.shapes import ModelShape, TrainLayout
from glmsnake.resources.terms import GIB, Estimate, gib

if TYPE_CHECKING:
    from glmsnake.config import Preset, Run, Workflow

WARN_AT = 0.9


@dataclass
class Finding:
    level: str  # error | warning
    where: str
    problem: str
    fixes: list[str] = field(default_factory=list)

    def text(self) -> str:
        fix = "; or ".join(self.fixes) if self.fixes else "see `glmsnake plan --resources --explain`"
        return f"{self.where}: {self.problem}\n    fix: {fix}"


@dataclass
class RunPlan:
    name: str
    layout: TrainLayout
    training: list[Estimate]
    rollout: Estimate
    kv: dict
    host: Estimate


@dataclass
class ResourcePlan:
    runs: dict[str, RunPlan]
    disk: Estimate
    disk_pending: float
    disk_free: float
    times: Estimate
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]


def gpu_bytes(preset: "Preset") -> float:
    return preset.hardware.gpu_memory_gib * GIB


def quota_bytes(preset: "Preset") -> float | None:
    q = preset.hardware.base_dir_quota_tib
    return q * 2**40 if q else None


def plan_run(preset: "Preset", run: "Run") -> RunPlan:
    shape, lay = ModelShape.of(preset.model), TrainLayout.of(preset, run)
    roll = rollout.RolloutLayout.of(run, lay.gpus)
    rest, kv = rollout.rollout_estimate(shape, roll, gpu_bytes(preset))  # SGLang keeps the MTP layer to draft
    trained = shape if run.features.mtp_training else dataclasses.replace(shape, mtp_layers=0)  # Megatron loads it only to train it
    reference = run.grpo.use_kl_loss or run.grpo.kl_coef > 0
    hst = host.host_estimate(trained, lay, run.train.allocation.gpus_per_node, run.train.colocate, reference)
    return RunPlan(run.name, lay, training.training_estimates(trained, lay), rest, kv, hst)


def training_peak(plan: RunPlan) -> tuple[float, Estimate]:
    worst = max(plan.training, key=lambda e: e.total)
    return worst.total + training.CONTEXT_BYTES, worst


# ----------------------------------------------------------------- findings per run


def _level(used: float, budget: float) -> str | None:
    return "error" if used > budget else "warning" if used > WARN_AT * budget else None


def run_findings(preset: "Preset", run: "Run") -> list[Finding]:
    plan, hw = plan_run(preset, run), preset.hardware
    out: list[Finding] = []
    where = f"runs.{run.name}"
    budget = gpu_bytes(preset)

    used, worst = training_peak(plan)
    if level := _level(used, budget):
        term = max((t for t in worst.terms), key=lambda t: t.bytes)
        fixes = _fixes(preset, run, lambda p: training_peak(p)[0] <= WARN_AT * budget) if level == "error" else []
        out.append(Finding(level, where, f"training needs {gib(used)} of a {gib(budget)} {hw.gpu} on the "
                           f"{worst.what.split(', ')[1]} (largest term: {term.name}, {gib(term.bytes)})", fixes))

    weights = plan.kv["weights"]
    if weights > plan.kv["budget"]:
        out.append(Finding("error", where, f"SGLang's weights need {gib(weights)} per GPU but mem_fraction_static "
                           f"leaves {gib(plan.kv['budget'])}",
                           _fixes(preset, run, lambda p: p.kv["weights"] <= WARN_AT * p.kv["budget"], _rollout_candidates)))
    elif plan.kv["tokens_per_engine"] < plan.kv["tokens_per_request"]:
        out.append(Finding("error", where, f"the KV cache of a rollout engine holds {plan.kv['tokens_per_engine']:.0f} "
                           f"tokens, less than one request ({plan.kv['tokens_per_request']} tokens)",
                           _fixes(preset, run, lambda p: p.kv["tokens_per_engine"] >= p.kv["tokens_per_request"],
                                  _rollout_candidates)))

    host_budget = hw.host_memory_gib * GIB
    if level := _level(plan.host.total, host_budget):
        fixes = _fixes(preset, run, lambda p: p.host.total <= WARN_AT * host_budget
                       and training_peak(p)[0] <= budget, _host_candidates) if level == "error" else []
        out.append(Finding(level, where, f"a training node needs {gib(plan.host.total)} of host memory of "
                           f"{gib(host_budget)} (largest term: {plan.host.largest().name})", fixes))
    return out


# ----------------------------------------------------------------- fixes that are checked


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _training_candidates(preset: "Preset", run: "Run") -> list[tuple[str, dict]]:
    p, m = run.perf, preset.model
    out: list[tuple[str, dict]] = []
    if p.recompute_granularity != "full" or (p.recompute_num_layers or 1) > 1 or p.recompute_method == "block":
        was = f"{p.recompute_method or ''} {p.recompute_num_layers or ''} layer(s)".strip() if p.recompute_granularity == "full" \
            else (p.recompute_granularity or "no recompute")
        out.append((f"full recompute instead of {was} (perf: recompute_granularity full, recompute_method uniform, "
                    "recompute_num_layers 1)",
                    {"perf": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}))
    if not run.optimizer.optimizer_cpu_offload:
        out.append(("turn on optimizer CPU offload (optimizer: optimizer_cpu_offload true, "
                    "use_precision_aware_optimizer true)",
                    {"optimizer": {"optimizer_cpu_offload": True, "use_precision_aware_optimizer": True}}))
    pp = p.pipeline_model_parallel_size * 2
    while pp <= m.num_layers:
        out.append((f"pipeline parallel {pp} (perf: pipeline_model_parallel_size {pp})",
                    {"perf": {"pipeline_model_parallel_size": pp}}))
        pp *= 2
    if p.use_dynamic_batch_size and p.max_tokens_per_gpu:
        t = p.max_tokens_per_gpu
        for step in (0.75, 0.5, 0.25):
            new = max(1024, int(t * step) // 1024 * 1024)
            if new < t:
                out.append((f"max_tokens_per_gpu {new} (perf)", {"perf": {"max_tokens_per_gpu": new}}))
    for size, key in ((p.expert_model_parallel_size * 2, "expert_model_parallel_size"),
                      (p.tensor_model_parallel_size * 2, "tensor_model_parallel_size")):
        out.append((f"{key.split('_model')[0]} parallel {size} (perf: {key} {size})", {"perf": {key: size}}))
    return out


def _rollout_candidates(preset: "Preset", run: "Run") -> list[tuple[str, dict]]:
    from glmsnake.recipe.command import sglang_args

    sg = sglang_args(run)
    out = [(f"rollout_num_gpus_per_engine {sg.rollout_num_gpus_per_engine * k} (sglang)",
            {"sglang": {"rollout_num_gpus_per_engine": sg.rollout_num_gpus_per_engine * k}}) for k in (2, 4)]
    if not run.features.fp8_rollout:
        out.append(("serve FP8 weights (features: fp8_rollout true)", {"features": {"fp8_rollout": True}}))
    frac = sg.mem_fraction_static or rollout.DEFAULT_MEM_FRACTION
    if frac < 0.85:
        out.append(("sglang mem_fraction_static 0.85", {"sglang": {"mem_fraction_static": 0.85}}))
    return out


def _host_candidates(preset: "Preset", run: "Run") -> list[tuple[str, dict]]:
    a = run.train.allocation
    out = [(f"train.allocation.nodes {a.nodes * k} (the optimizer shards spread over more nodes)",
            {"train": {"allocation": {"nodes": a.nodes * k}}}) for k in (2, 4)]
    if run.optimizer.optimizer_cpu_offload:
        out.insert(0, ("turn off optimizer CPU offload (optimizer: optimizer_cpu_offload false)",
                       {"optimizer": {"optimizer_cpu_offload": False}}))
    return out


def _fixes(preset: "Preset", run: "Run", fits: Callable[[RunPlan], bool],
           candidates: Callable[["Preset", "Run"], list[tuple[str, dict]]] = _training_candidates) -> list[str]:
    """Candidate changes that pass the layout checks and make the run fit: up to three single ones,
    else the first combination of them (in order) that does."""
    from glmsnake.config import Run
    from glmsnake.parallel_layout import check_run

    def attempt(patch: dict) -> bool:
        try:
            changed = Run.model_validate(_merge(run.model_dump(exclude_unset=True), patch))
        except Exception:  # noqa: BLE001 - a candidate the config models refuse is no fix
            return False
        return not check_run(preset, changed) and fits(plan_run(preset, changed))

    cands = candidates(preset, run)
    single = [label for label, patch in cands if attempt(patch)]
    if single:
        return single[:3]
    labels, patch = [], {}
    for label, p in cands:
        trial = _merge(patch, p)
        try:
            Run.model_validate(_merge(run.model_dump(exclude_unset=True), trial))
        except Exception:  # noqa: BLE001
            continue
        labels.append(label)
        patch = trial
        if attempt(patch):
            return [" + ".join(labels)]
    return []


# ----------------------------------------------------------------- the workflow


def disk_findings(wf: "Workflow", est: Estimate, pending: float,
                  running: set[tuple[str, str | None]] | None = None) -> tuple[list[Finding], float]:
    free = disk.free_bytes(wf.base)
    quota = quota_bytes(wf.preset)
    out = []
    if pending > free:
        out.append(Finding("error", "base_dir", f"the outputs still to write need {disk.human(pending)} under "
                           f"{wf.base}, but its file system has {disk.human(free)} free",
                           [f"base_dir needs {disk.human(pending - free)} more (free space, or another base_dir)"]
                           + _fewer_checkpoints(wf, free, quota, running)))
    elif pending > WARN_AT * free:
        out.append(Finding("warning", "base_dir", f"the outputs still to write need {disk.human(pending)}, "
                           f"{pending / free:.0%} of the {disk.human(free)} free under {wf.base}"))
    if quota is not None and est.total > quota:
        out.append(Finding("error", "base_dir", f"all outputs together need {disk.human(est.total)}, more than the "
                           f"quota of {wf.preset.hardware.base_dir_quota_tib:g} TiB",
                           [f"base_dir needs {disk.human(est.total - quota)} more quota"]
                           + _fewer_checkpoints(wf, free, quota, running)))
    return out, free


def _fewer_checkpoints(wf: "Workflow", free: float, quota: float | None, running=None) -> list[str]:
    """Keeping only the newest checkpoint of every run, if that alone brings the outputs under both limits."""
    from glmsnake.config import KeepCheckpoints

    runs = {n: r.model_copy(update={"train": r.train.model_copy(update={"keep_checkpoints": KeepCheckpoints(last=1)})})
            for n, r in wf.runs.items()}
    est, pending = storage.disk_estimate(wf.model_copy(update={"runs": runs}), running)
    if pending <= free and (quota is None or est.total <= quota):
        return [f"keep only the newest checkpoint (train: keep_checkpoints: {{last: 1}} in {', '.join(sorted(runs))})"]
    return []


def plan_resources(wf: "Workflow", only: str | None = None) -> ResourcePlan:
    runs = {n: r for n, r in wf.runs.items() if only in (None, n)}
    plans = {n: plan_run(wf.preset, r) for n, r in runs.items()}
    findings = [f for r in runs.values() for f in run_findings(wf.preset, r)]
    est, pending = storage.disk_estimate(wf)
    found, free = disk_findings(wf, est, pending)
    m = wf.preset.model
    times = timing.conversion_times(wf, storage.torch_dist_bytes(m), storage.hf_bytes(m))
    return ResourcePlan(plans, est, pending, free, times, findings + found)


def config_findings(wf: "Workflow") -> list[Finding]:
    """For the config validation: the GPU, rollout and host budgets of every run (the config alone decides them)."""
    return [f for r in wf.runs.values() for f in run_findings(wf.preset, r)]


def base_dir_findings(wf: "Workflow", running: set[tuple[str, str | None]] | None = None) -> list[Finding]:
    """For a workflow about to run these (rule, run) jobs: base_dir's free space and quota now
    (they change, the config does not)."""
    est, pending = storage.disk_estimate(wf, running)
    return disk_findings(wf, est, pending, running)[0]
