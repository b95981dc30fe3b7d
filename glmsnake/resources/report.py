"""`glmsnake plan --resources [--explain]`: the estimates as tables, every term with its inputs on request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmsnake import disk
from glmsnake.resources import planner, training
from glmsnake.resources.shapes import PROMPT_TOKENS
from glmsnake.resources.terms import GIB, Estimate, gib

if TYPE_CHECKING:
    from glmsnake.config import Workflow


def _table(est: Estimate, explain: bool, budget: float | None = None, unit=gib):
    from rich.table import Table

    t = Table(title=est.what, title_justify="left")
    t.add_column("term")
    t.add_column("size", justify="right")
    if explain:
        t.add_column("from", overflow="fold")
    for term in est.terms:
        t.add_row(term.name, unit(term.bytes), *([term.how] if explain else []))
    total = est.total
    share = f" ({total / budget:.0%} of {unit(budget)})" if budget else ""
    t.add_row("[b]total[/b]", f"[b]{unit(total)}[/b]{share}", *([""] if explain else []))
    return t


def _stages_table(ests: list[Estimate], explain: bool, budget: float):
    """Training GPU memory: one column per pipeline stage, one row per term."""
    from rich.table import Table

    t = Table(title="training GPU memory per pipeline stage", title_justify="left")
    t.add_column("term")
    for e in ests:
        t.add_column(e.what.split(", ")[1], justify="right")
    names = list(dict.fromkeys(term.name for e in ests for term in e.terms))
    for name in names:
        t.add_row(name, *(next((gib(x.bytes) for x in e.terms if x.name == name), "-") for e in ests))
    t.add_row("CUDA context + NCCL", *(gib(training.CONTEXT_BYTES) for _ in ests))
    totals = [e.total + training.CONTEXT_BYTES for e in ests]
    t.add_row("[b]total[/b]", *(f"[b]{gib(x)}[/b] ({x / budget:.0%})" for x in totals))
    notes = []
    if explain:
        for e in ests:
            notes += [f"  {e.what.split(', ')[1]}: {x.name}: {x.how}" for x in e.terms]
        notes.append(f"  CUDA context + NCCL: {training.CONTEXT_BYTES / 1e9:.1f} GB, measured on an H200 "
                     "(torch 2.11, CUDA 13, one process)")
    return t, notes


def _seconds(s: float) -> str:
    return "not estimated" if not s else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def print_resources(wf: "Workflow", run: str | None, explain: bool) -> int:
    from rich.console import Console

    plan = planner.plan_resources(wf, run)
    hw = wf.preset.hardware
    console = Console(width=200 if explain else 120)
    console.print(f"[b]Resources[/b] (preset {wf.user.preset}; hardware: {hw.gpus_per_node} x {hw.gpu} "
                  f"({hw.gpu_memory_gib:g} GiB), {hw.host_memory_gib:g} GiB RAM a node"
                  + (f", base_dir quota {hw.base_dir_quota_tib:g} TiB" if hw.base_dir_quota_tib else "") + ")")
    gpu = planner.gpu_bytes(wf.preset)
    for name, rp in plan.runs.items():
        lay = rp.layout
        console.print(f"\n[b]run {name}[/b]: {lay.gpus} GPUs, TP {lay.tp} PP {lay.pp} CP {lay.cp} EP {lay.ep} ETP {lay.etp}"
                      f"{' SP' if lay.sp else ''}, {lay.tokens} tokens per GPU, recompute {lay.recompute}, "
                      f"{lay.attention} attention, optimizer {'on the host' if lay.cpu_offload else 'on the GPU'}")
        table, notes = _stages_table(rp.training, explain, gpu)
        console.print(table)
        for line in notes:
            console.print(line, highlight=False)
        console.print(_table(rp.rollout, explain, gpu))
        kv = rp.kv
        waves = kv["tokens_needed_per_engine"] / kv["tokens_per_engine"] if kv["tokens_per_engine"] else float("inf")
        line = (f"  KV cache: {kv['kv_bytes_per_token'] / 1024:.1f} KiB a token per GPU; an engine holds "
                f"{kv['tokens_per_engine']:,.0f} tokens; the rollout batch sends it {kv['requests_per_engine']:g} "
                f"requests of up to {kv['tokens_per_request']:,} tokens (prompt assumed {PROMPT_TOKENS}) = "
                f"{kv['tokens_needed_per_engine']:,.0f} tokens"
                + (f": at full length they run in about {waves:.1f} waves (queued, not failed)" if waves > 1 else ""))
        console.print(line, soft_wrap=True)
        console.print(_table(rp.host, explain, hw.host_memory_gib * GIB))
    console.print(_table(plan.disk, explain, planner.quota_bytes(wf.preset), unit=disk.human))
    console.print(f"  still to write: {disk.human(plan.disk_pending)}; free under {wf.base} now: {disk.human(plan.disk_free)}")
    t = _table(plan.times, explain, unit=_seconds)
    console.print(t)
    for f in plan.findings:
        console.print(f"[{'red' if f.level == 'error' else 'yellow'}]{f.level}[/]: {f.text()}", highlight=False,
                      soft_wrap=True, markup=True)
    if not plan.findings:
        console.print("Every budget holds (warnings start at 90%).")
    return 2 if plan.errors else 0


def run_of(wildcards: str) -> str | None:
    """The `run` wildcard of a dry run's `wildcards: run=..., ...` line."""
    return dict(kv.split("=", 1) for kv in wildcards.split(", ") if "=" in kv).get("run")


def step_needs(wf: "Workflow", rule: str, wildcards: str, plan: "planner.ResourcePlan") -> str:
    """One line per step for `glmsnake plan`: what it needs of the budgets."""
    by_name = {t.name: t for t in plan.disk.terms}
    times = {t.name: t.bytes for t in plan.times.terms}

    def size(name: str) -> str:
        t = by_name.get(name) or by_name.get(name + " (written)")
        return disk.human(t.bytes) if t else ""

    if rule == "download_hf":
        return f"disk {size('HF weights')}"
    if rule == "convert_torch_dist":
        return f"disk {size('torch_dist')}, ~{_seconds(times.get('torch_dist', 0))}"
    if rule == "convert_fp8":
        return f"disk {size('FP8 weights')}, ~{_seconds(times.get('FP8', 0))}"
    run = run_of(wildcards)
    if rule == "train_run" and run in plan.runs:
        used, worst = planner.training_peak(plan.runs[run])
        gpu = planner.gpu_bytes(wf.preset)
        return (f"GPU {gib(used)} of {gib(gpu)} ({used / gpu:.0%}, {worst.what.split(', ')[1]}), "
                f"host {gib(plan.runs[run].host.total)} a node, checkpoints {size(f'run {run}: checkpoints')}")
    if rule == "export_hf" and run:
        return f"disk {size(f'run {run}: HF export')}"
    return ""
