"""Bad input stops at the door: a table of mistakes, each made the way a user would make it.

Every case runs the real command: `snakemake` with the local (or slurm) profile in a project
folder of its own, or `glmsnake` from an unrelated directory. base_dir already holds finished
weights and conversions (made once, for real). Each case checks:
- the exit code, and that the output names the problem and the fix, with no traceback;
- nothing allocated: these runs find no Slurm controller (no slurm.conf, no DNS in the test
  session), so an sbatch would fail with Slurm's words instead; and no job folder appears under base_dir;
- nothing downloaded: the hub endpoint served no file during the whole corpus;
- no file under base_dir changed (sha256 before and after). A mistake only a step can see (what
  a file holds, a full disk) lets that step run, the first time (its output absent): it may
  leave its log and the workflow lock, and must not publish its output; nothing else may change.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO, skip_or_fail, snakemake
from glmsnake.resolve import deep_merge
from tree_hash import tree_hash

PREP = "prep"  # the finished base every case starts from
MODEL = "tiny-glm4moe"
RECIPE = "glm4.7-355b-64xh100"
GOOD_ROW = '{"prompt": "1+1=", "label": "2"}\n'
DEFAULT = {"base_dir": "{base}", "preset": "tiny", "launcher": "local", "runs": {"default": {}}}
HUB_MODEL = "zai-org/Tiny-GLM"
WHOLE_CHECKPOINT = {"metadata.json", ".metadata", "common.pt", "glmsnake_trainer_state.pt"}
TRAINING_INPUTS = (MODEL, f"{MODEL}_torch_dist", f"{MODEL}-FP8", "data")


@dataclass
class Case:
    id: str
    says: tuple[str, ...]  # the problem, in the words the output must hold
    fix: str  # the fix, after "fix:"
    config: dict | str = field(default_factory=dict)  # merged onto DEFAULT; a str is the whole file as written
    run: tuple[str, ...] = ("snakemake", "train")  # or ("slurm", target), or ("glmsnake", *args)
    code: int = 2
    step_output: str | None = None  # a step runs and refuses: its output (relative to base), absent before and after
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # made in the case folder first; None: a folder
    mount: str | None = None  # a tmpfs for base_dir: "SIZE" (a full disk) or "ro" (a read-only one)
    copy: tuple[str, ...] = ()  # for a mount: what of the finished base to copy into it
    mid_run: bool = False  # not refused early: the disk fills while the step runs; the cause must be named
    fill_at: str | None = None  # mid-run: once this path (relative to base) appears, another writer fills the disk


def config_cases() -> list[Case]:
    run = lambda **groups: {"runs": {"r": groups}}  # noqa: E731
    bound = "correct the keys named above"
    return [
        Case("num_rollout < 0", ("runs.r.rollout.num_rollout: Input should be greater than 0 (got -1)",), bound,
             run(rollout={"num_rollout": -1})),
        Case("rollout_batch_size 0", ("runs.r.rollout.rollout_batch_size: Input should be greater than 0",), bound,
             run(rollout={"rollout_batch_size": 0})),
        Case("n_samples_per_prompt 0", ("runs.r.rollout.n_samples_per_prompt: Input should be greater than 0",), bound,
             run(rollout={"n_samples_per_prompt": 0})),
        Case("temperature < 0", ("runs.r.rollout.rollout_temperature: Input should be greater than or equal to 0",),
             bound, run(rollout={"rollout_temperature": -0.5})),
        Case("lr < 0", ("runs.r.optimizer.lr: Input should be greater than 0 (got -1e-06)",), bound,
             run(optimizer={"lr": -1e-6})),
        Case("adam_beta2 1.5", ("runs.r.optimizer.adam_beta2: Input should be less than 1",), bound,
             run(optimizer={"adam_beta2": 1.5})),
        Case("eps_clip 0", ("runs.r.grpo.eps_clip: Input should be greater than 0",), bound, run(grpo={"eps_clip": 0})),
        Case("eval_interval 0", ("runs.r.eval.eval_interval: Input should be greater than 0",), bound,
             run(eval={"eval_interval": 0})),
        Case("mem_fraction 1.5", ("runs.r.sglang.mem_fraction_static: Input should be less than or equal to 1",), bound,
             run(sglang={"mem_fraction_static": 1.5})),
        Case("save_interval 0", ("runs.r.train.save_interval: Input should be greater than or equal to 1",), bound,
             run(train={"save_interval": 0})),
        Case("on_change maybe", ("runs.r.train.on_change: Input should be 'restart' or 'continue'",), bound,
             run(train={"on_change": "maybe"})),
        Case("nodes 0", ("runs.r.train.allocation.nodes: Input should be greater than or equal to 1",), bound,
             run(train={"allocation": {"nodes": 0}})),
        Case("rollout batch a string", ("runs.r.rollout.rollout_batch_size: Input should be a valid integer",), bound,
             run(rollout={"rollout_batch_size": "many"})),
        Case("no runs", ("no runs: name at least one",), "correct the keys",
             "base_dir: {base}\nruns: {}\n"),
        Case("run name a|b", ("run name 'a|b' may hold only letters, digits, '_', '-' and '.'",), "correct the keys",
             {"runs": {"a|b": {}}}),
        Case("run name injection", ("run name 'a&touch INJECTED&' may hold only letters",), "correct the keys",
             {"runs": {"a&touch INJECTED&": {}}}),
        Case("run name with a space", ("run name 'a b' may hold only letters",), "correct the keys",
             {"runs": {"a b": {}}}),
        Case("run name *", ("run name '*' may hold only letters",), "correct the keys", {"runs": {"*": {}}}),
        Case("run overrides a list", ("config.runs.r: Input should be a valid dictionary (got [1, 2])",), "correct the keys",
             {"runs": {"r": [1, 2]}}),
        Case("run overrides the model", ("runs.r overrides ['model'], which are not per-run settings",),
             "correct the keys", run(model={"hidden_size": 64})),
        Case("blank base_dir", ("base_dir is empty",), "correct the keys", {"base_dir": " "}),
        Case("unknown preset", ("unknown preset 'glm5'",), f"set `preset:` to one of ['{RECIPE}', 'glm4.7-flash-16xh100', 'glm4.7-flash-8xh100', 'tiny', 'tiny-mla']",
             {"preset": "glm5"}),
        Case("unknown key", ("config.presett: unknown key",), "correct the keys", {"presett": "tiny"}),
        Case("unknown nested key", ("perf.tensor_parallel: unknown key",), "correct the keys",
             {"overrides": {"perf": {"tensor_parallel": 2}}}),
        Case("unknown launcher", ("config.launcher: Input should be 'local' or 'slurm'",), "correct the keys",
             {"launcher": "kubernetes"}, run=("glmsnake", "render", "--configfile", "{config}")),  # a profile sets it
        Case("zero attention heads", ("model.num_attention_heads: Input should be greater than 0",), "correct the keys",
             {"overrides": {"model": {"num_attention_heads": 0}}}),
        Case("shared expert size", ("moe_shared_expert_intermediate_size=40 is not a multiple of moe_ffn_hidden_size=32",),
             "set it to a multiple of 32", {"overrides": {"model": {"moe_shared_expert_intermediate_size": 40}}}),
        Case("query groups", ("num_query_groups=3 does not divide num_attention_heads=4",),
             "set num_query_groups to one of [1, 2, 4]", {"overrides": {"model": {"num_query_groups": 3}}}),
        Case("top-k > experts", ("moe_router_topk=9 is more than the 8 experts",), "set moe_router_topk <= 8",
             {"overrides": {"model": {"moe_router_topk": 9}}}),
        Case("moe_layer_freq length", ("model.moe_layer_freq",), "write one 0/1 per layer",
             {"overrides": {"model": {"moe_layer_freq": "[0]*1+[1]*9"}}}),
        Case("TP 3", ("TP=3 does not divide the 4 attention heads",), "set tensor_model_parallel_size to one of [1, 2, 4]",
             {"overrides": {"perf": {"tensor_model_parallel_size": 3}}}),
        Case("PP deeper than the model", ("PP=8 is more than the", "layers"), "pipeline_model_parallel_size",
             {"overrides": {"perf": {"pipeline_model_parallel_size": 8}}}),
        Case("time below the step minimum", ("time_min=10 is shorter than this step's minimum of 30 minutes",),
             "correct the keys", {"preset": RECIPE, "runs": {"r": {"train": {"allocation": {"time_min": 10}}}}}),
        Case("FP8 block size", ("block_size",), "correct the keys", {"overrides": {"convert": {"fp8": {"block_size": [0, 128]}}}}),
        Case("slime on the local launcher", ("train.backend slime runs slime's train.py on GPU nodes, but the launcher is 'local'",),
             "run with --profile slurm", {"preset": RECIPE}),
        Case("slime misses its final save", ("num_rollout=3000 is not a multiple of save_interval=7",),
             "choose a save_interval that divides num_rollout",
             {"preset": RECIPE, "launcher": "slurm", "runs": {"r": {"train": {"save_interval": 7}}}}, run=("slurm", "train")),
        Case("slime export of a local-trainer run", ("export.backend slime runs slime's converter",),
             "set export.backend: glmsnake", {"overrides": {"export": {"backend": "slime"}}}),
        Case("layout on the slurm profile", ("TP=3 does not divide the 4 attention heads",), "set tensor_model_parallel_size",
             {"launcher": "slurm", "overrides": {"perf": {"tensor_model_parallel_size": 3}}}, run=("slurm", "train")),
        Case("YAML syntax", ("config/config.yaml:3:1: not valid YAML",), "fix the YAML syntax at that line",
             "base_dir: {base}\nruns: {default: {}\n"),
        Case("config is a list", ("holds a list, not a mapping of keys",), "write the config as `key: value` lines",
             "- base_dir: {base}\n"),
        Case("tab-indented YAML", ("not valid YAML",), "fix the YAML syntax at that line",
             "base_dir: {base}\nruns:\n\tdefault: {}\n"),
    ]


def source_cases() -> list[Case]:
    weights = lambda source: {"overrides": {"weights": {"source": source}}}  # noqa: E731
    data = lambda **ds: {"overrides": {"datasets": {"prompt": ds}}}  # noqa: E731
    ckpt = "point weights.source `local:` at an HF checkpoint folder"
    jsonl = "point the dataset's `local:` at a .jsonl file"
    return [
        Case("local weights missing", ("weights: local {case}/nowhere does not exist",), ckpt, weights("local:{case}/nowhere")),
        Case("local weights a file", ("weights: local {case}/w.bin is a file, not a checkpoint folder",), ckpt,
             weights("local:{case}/w.bin"), files={"w.bin": b"x"}),
        Case("local weights empty folder", ("holds no config.json and no *.safetensors",), ckpt,
             weights("local:{case}/w"), files={"w": None}),
        Case("local weights of another model", ("config.json does not match the preset's MODEL args", "hidden_size"),
             "use the preset that matches these weights", weights("local:{case}/other"), files={"other/": "other-model"}),
        Case("local weights, relative path", ("weights: local {case}/project/rel/w does not exist",), ckpt,
             weights("local:rel/w")),
        Case("hub weights bad syntax", ("source 'hf://GLM-4.7' must be 'tiny', 'hf://owner/name@revision' or 'local:/path'",),
             "correct the keys", weights("hf://GLM-4.7")),
        Case("hub weights a dataset repo", ("is a dataset repo, but this is a model",), "correct the keys",
             weights("hf://datasets/zai-org/x@main")),
        Case("unknown source scheme", ("source 's3://bucket/glm' must be 'tiny'",), "correct the keys",
             weights("s3://bucket/glm")),
        Case("local dataset missing", ("datasets.prompt: local {case}/none.jsonl does not exist",), jsonl,
             data(source="local:{case}/none.jsonl")),
        Case("local dataset a folder", ("datasets.prompt: local {case}/d is a folder, not a .jsonl file",), jsonl,
             data(source="local:{case}/d"), files={"d": None}),
        Case("local dataset empty", ("datasets.prompt: local {case}/e.jsonl is empty",), "write at least one JSON object",
             data(source="local:{case}/e.jsonl"), files={"e.jsonl": ""}),
        Case("hub dataset without file", ("needs `file:`, the .jsonl file's path inside the repo",), "correct the keys",
             data(source="hf://datasets/zai-org/prompts@main")),
        Case("hub dataset a model repo", ("is a model repo, but this is a dataset",), "correct the keys",
             data(source="hf://zai-org/prompts@main", file="p.jsonl")),
        Case("base_dir is a file", ("base_dir {case}/taken/base: {case}/taken is a file, not a folder",),
             "set base_dir to a folder on a writable file system", {"base_dir": "{case}/taken/base"}, files={"taken": "x"}),
    ]


def content_cases() -> list[Case]:
    """What only the step that reads a file can see: it runs, refuses, publishes nothing."""
    def dataset(case_id: str, text: str, says: str) -> Case:
        return Case(case_id, ("{case}/p.jsonl" + says,), "rollout.input_key and label_key",
                    {"overrides": {"datasets": {"prompt": {"source": "local:{case}/p.jsonl"}}}},
                    run=("snakemake", "{base}/data/prompt.jsonl"), code=1, step_output="data/prompt.jsonl",
                    files={"p.jsonl": text})
    return [
        dataset("dataset: broken JSON line", GOOD_ROW + '{"prompt": "2+2=", "label": \n', ":2: not JSON"),
        dataset("dataset: a list row", GOOD_ROW + '["a", "b"]\n', ":2: a JSON list, not an object"),
        dataset("dataset: no input key", GOOD_ROW + '{"question": "2+2=", "label": "4"}\n', ":2: no 'prompt'"),
        dataset("dataset: no label key", GOOD_ROW + '{"prompt": "2+2="}\n', ":2: no 'label'"),
        dataset("dataset: blank lines only", "\n\n", ": no rows"),
        Case("dataset: not UTF-8", ("{case}/p.jsonl is not UTF-8 text (byte 0)",), "save the file as UTF-8 JSON lines",
             {"overrides": {"datasets": {"prompt": {"source": "local:{case}/p.jsonl"}}}},
             run=("snakemake", "{base}/data/prompt.jsonl"), code=1, step_output="data/prompt.jsonl",
             files={"p.jsonl": b"\xff\xfe{"}),
        Case("local weights: truncated shard", ("{case}/cut/model-00001-of-00003.safetensors is", "the file is truncated"),
             "download or copy it again",
             {"overrides": {"weights": {"source": "local:{case}/cut"}}},
             run=("snakemake", f"{{base}}/{MODEL}/glmsnake.manifest.json"), code=1,
             step_output=f"{MODEL}/glmsnake.manifest.json", files={"cut/": "truncated"}),
    ]


def cli_cases() -> list[Case]:
    cfg = ("--configfile", "{config}")
    return [
        Case("render: unknown run", ("no run named 'nosuch'",), "choose one of ['default']", run=("glmsnake", "render", *cfg, "--run", "nosuch")),
        Case("status: unknown run", ("no run named 'nosuch'",), "choose one of ['default']", run=("glmsnake", "status", *cfg, "nosuch")),
        Case("render: missing config file", ("config file {case}/nope.yaml does not exist",), "pass --configfile PATH",
             run=("glmsnake", "render", "--configfile", "{case}/nope.yaml")),
        Case("status: missing config file", ("config file {case}/nope.yaml does not exist",), "pass --configfile PATH",
             run=("glmsnake", "status", "--configfile", "{case}/nope.yaml")),
        Case("plan: YAML error", ("config/config.yaml:2:1: not valid YAML",), "fix the YAML syntax",
             "runs: {default: {}\n", run=("glmsnake", "plan", *cfg)),
        Case("plan: bad key", ("config.presett: unknown key",), "correct the keys", {"presett": 1}, run=("glmsnake", "plan", *cfg)),
        Case("plan: unknown target", ("no step makes 'nosuch'",), "name a target rule", run=("glmsnake", "plan", *cfg, "nosuch")),
        Case("plan: slime on local", ("train.backend slime runs slime's train.py on GPU nodes",), "run with --profile slurm",
             {"preset": RECIPE}, run=("glmsnake", "plan", *cfg)),
        Case("status: bad layout", ("TP=3 does not divide",), "set tensor_model_parallel_size",
             {"overrides": {"perf": {"tensor_model_parallel_size": 3}}}, run=("glmsnake", "status", *cfg)),
        Case("render: unknown preset flag", ("unknown preset 'nosuch'",), "set `preset:` to one of",
             run=("glmsnake", "render", *cfg, "--preset", "nosuch")),
        Case("verify: unknown target", ("no target 'nosuch'",), "choose one of ['weights'", run=("glmsnake", "verify", *cfg, "nosuch")),
        Case("step without its options", ("step train needs --sentinel, --run",), "run steps through snakemake",
             run=("glmsnake", "step", "train")),
        Case("step unknown", ("no step named 'nosuch'",), "choose one of", run=("glmsnake", "step", "nosuch")),
        Case("step outside Snakemake", ("`glmsnake step` found no config",), "run steps through Snakemake",
             run=("glmsnake", "step", "train", "--run", "default", "--sentinel", "{case}/s.json")),
        Case("setup-profiles onto a file", ("cannot make the profile folder {case}/f",), "pass --dest a folder",
             run=("glmsnake", "setup-profiles", "--dest", "{case}/f"), files={"f": "x"}),
        Case("convert-fp8: missing model dir", ("{case}/none does not exist",), "point --model-dir at a Hugging Face checkpoint",
             run=("glmsnake", "convert-fp8", "--model-dir", "{case}/none", "--save-dir", "{case}/out")),
        Case("convert-fp8: save into the input", (f"--save-dir {{base}}/{MODEL} overlaps --model-dir {{base}}/{MODEL}",),
             "write the FP8 checkpoint to its own folder",
             run=("glmsnake", "convert-fp8", "--model-dir", f"{{base}}/{MODEL}", "--save-dir", f"{{base}}/{MODEL}")),
        Case("convert-fp8: zero workers", ("--workers must be at least 1, got 0",), "pass e.g. --workers 4",
             run=("glmsnake", "convert-fp8", "--model-dir", f"{{base}}/{MODEL}", "--save-dir", "{case}/out", "--workers", "0")),
    ]


def disk_cases() -> list[Case]:
    full = "free space on that file system"
    return [
        Case("disk: base_dir read-only", ("base_dir {case}/mnt is on a read-only file system",),
             "set base_dir to a folder on a writable file system", {"base_dir": "{case}/mnt"}, mount="ro",
             copy=(MODEL,)),
        # Refused when the workflow starts running jobs: the estimate of what they write does not fit.
        Case("disk: download does not fit", ("not enough disk for this workflow", "base_dir: the outputs still to write "
                                             "need", "under {case}/mnt, but its file system has"), "base_dir needs",
             {"base_dir": "{case}/mnt", "overrides": {"weights": {"source": f"hf://{HUB_MODEL}@main"}}},
             run=("snakemake", f"{{case}}/mnt/{MODEL}/glmsnake.manifest.json"), mount="96k"),
        Case("disk: FP8 does not fit", ("not enough disk for this workflow", "base_dir: the outputs still to write need",
                                        "under {case}/mnt, but its file system has"), "base_dir needs",
             {"base_dir": "{case}/mnt"}, run=("snakemake", f"{{case}}/mnt/{MODEL}-FP8/glmsnake.done.json"),
             mount="+48k", copy=(MODEL, f"{MODEL}_torch_dist", "data")),
        Case("disk: full while writing", ("no space left while writing {case}/mnt/data/prompt.jsonl (No space left on device)", "free of"), full,
             {"base_dir": "{case}/mnt", "overrides": {"datasets": {"prompt": {"source": "local:{case}/big.jsonl"}}}},
             run=("snakemake", "{case}/mnt/data/prompt.jsonl"), code=1, step_output="data/prompt.jsonl", mount="+16k",
             copy=(MODEL, "data"), files={"big.jsonl": GOOD_ROW * 60000}),
        Case("disk: checkpoints do not fit", ("not enough disk for this workflow", "base_dir: the outputs still to "
                                              "write need", "under {case}/mnt, but its file system has"), "base_dir needs",
             {"base_dir": "{case}/mnt"}, run=("snakemake", "{case}/mnt/runs/default/glmsnake.done.json"),
             mount="+1024k", copy=TRAINING_INPUTS),
        # Room for what the run keeps (two checkpoints), then another writer fills the disk after the first save.
        Case("disk: full during training", ("training driver of run default exited with 1; a checkpoint takes",
                                            "and the file system of {case}/mnt/runs/default/checkpoints has"), full,
             {"base_dir": "{case}/mnt", "runs": {"default": {"train": {"save_interval": 1, "keep_checkpoints": {"last": 1}}}}},
             run=("snakemake", "{case}/mnt/runs/default/glmsnake.done.json"), code=1, mount="+7700k", mid_run=True,
             fill_at="runs/default/checkpoints/iter_0000000", step_output="runs/default/glmsnake.done.json",
             copy=TRAINING_INPUTS),
    ]


CASES = config_cases() + source_cases() + content_cases() + cli_cases() + disk_cases()


# --------------------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A base_dir with finished weights, datasets, torch_dist and FP8, made for real."""
    wd = tmp_path_factory.mktemp("bad-input")
    snakemake(wd, "--profile", str(REPO / "profiles/local"), "weights", "torch_dist", "fp8",
              "--config", f"base_dir={wd / PREP}")
    return wd / PREP


@pytest.fixture(scope="module")
def corpus(prepared, tiny_hf):
    """Every case, run once, two at a time: {case id: output, exit code, base before and after}, downloads."""
    from hub_server import HubServer

    wd, prep = prepared.parent, prepared
    cases = [c for c in CASES if c.mount is None or can_mount()]  # the others say why in their test
    with HubServer() as hub:
        hub.add_repo(HUB_MODEL, tiny_hf)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(wd / "hf-home"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "GLMSNAKE_CONFIG", "SLURM_CONF"):
            env.pop(var, None)
        with ThreadPoolExecutor(2) as pool:
            results = dict(zip((c.id for c in cases), pool.map(lambda c: run_case(c, wd, prep, tiny_hf, env), cases)))
        downloads = [p for m, p, _ in hub.state.requests if m == "GET" and "/resolve/" in p]
    return results, downloads


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def run_case(case: Case, wd: Path, prep: Path, tiny_hf: Path, env: dict) -> dict:
    folder = wd / "cases" / "".join(ch if ch.isalnum() else "_" for ch in case.id)
    project, elsewhere = folder / "project", folder / "elsewhere"
    (project / "config").mkdir(parents=True)
    elsewhere.mkdir()
    base = folder / "mnt" if case.mount else folder / "base"
    subst = {"{case}": str(folder), "{base}": str(base), "{config}": str(project / "config" / "config.yaml")}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    make_files(case, folder, tiny_hf)
    config = case.config if isinstance(case.config, str) else yaml.safe_dump(deep_merge(DEFAULT, case.config))
    (project / "config" / "config.yaml").write_text(fill(config))
    if case.mount is None:
        shutil.copytree(prep, base, symlinks=True)
        if case.step_output:
            (base / case.step_output).unlink()

    kind, *args = case.run
    args = [fill(a) for a in args]
    if kind == "glmsnake":
        cmd, cwd = [str(Path(sys.executable).with_name("glmsnake")), *args], elsewhere
    else:
        profile = REPO / "profiles" / ("slurm" if kind == "slurm" else "local")
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(project),
               "--profile", str(profile), "--cores", "2", *args]
        cwd = project
    hasher = [sys.executable, str(REPO / "tests" / "tree_hash.py"), str(base)]
    t0 = time.monotonic()
    if case.mount is None:
        before = tree_hash(base)
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        after = tree_hash(base)
        result = {"out": proc.stdout + proc.stderr, "code": proc.returncode, "before": before, "after": after,
                  "base": str(base)}
    else:
        result = run_in_mount(case, cmd, cwd, env, base, prep, hasher, folder)
    return {**result, "seconds": time.monotonic() - t0}


def run_in_mount(case: Case, cmd, cwd, env, base: Path, prep: Path, hasher, folder: Path) -> dict:
    """The command in a mount namespace of its own, base_dir a tmpfs: hashes taken there too."""
    base.mkdir()
    copied = sum(du(prep / c) for c in case.copy)
    size = case.mount
    if size.startswith("+"):  # room for the copy, plus a little
        size = f"{copied // 1024 + 64 + int(size[1:-1])}k"
    mount = f"mount -t tmpfs -o size={size if size != 'ro' else '4m'} tmpfs {shlex.quote(str(base))}"
    copy = "".join(f" && cp -a {shlex.quote(str(prep / c))} {shlex.quote(str(base))}/" for c in case.copy)
    if case.step_output:
        copy += f" && rm -f {shlex.quote(str(base / case.step_output))}"
    remount = f" && mount -o remount,ro {shlex.quote(str(base))}" if case.mount == "ro" else ""
    q = lambda argv: " ".join(shlex.quote(str(a)) for a in argv)  # noqa: E731
    fill = ""
    if case.fill_at:  # in the background, inside the namespace: wait for the path, then take all but 2 MB
        # (less than a 3 MB checkpoint, enough for the logs and Ray logs that must name the cause)
        mark, filler, b = shlex.quote(str(base / case.fill_at)), shlex.quote(str(base / "filler")), shlex.quote(str(base))
        fill = (f" && {{ (for i in $(seq 3000); do [ -e {mark} ] && break; sleep 0.1; done; "
                f"head -c $(( $(df -B1 --output=avail {b} | tail -1) - 2000000 )) /dev/zero > {filler})"
                " >/dev/null 2>&1 & filler_pid=$!; }")
    script = (f"{mount}{copy}{remount} && {q(hasher)} > {folder}/before.json{fill} && "
              f"(cd {shlex.quote(str(cwd))} && {q(cmd)}) > {folder}/out.txt 2>&1; rc=$?; kill $filler_pid 2>/dev/null; "
              f"{q(hasher)} > {folder}/after.json; exit $rc")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
    out = (folder / "out.txt").read_text() if (folder / "out.txt").exists() else ""
    return {"out": out + proc.stdout + proc.stderr, "code": proc.returncode,
            "before": json.loads((folder / "before.json").read_text() or "{}"),
            "after": json.loads((folder / "after.json").read_text() or "{}"), "base": str(base)}


def du(path: Path) -> int:
    """Bytes a copy takes on a tmpfs (whole pages per file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files) + 4096 * (1 + sum(1 for _ in path.rglob("*")))


def make_files(case: Case, folder: Path, tiny_hf: Path) -> None:
    for name, content in case.files.items():
        path = folder / name.rstrip("/")
        if content is None:
            path.mkdir(parents=True)
        elif content == "other-model":  # the tiny checkpoint, its config.json saying another hidden size
            shutil.copytree(tiny_hf, path)
            cfg = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
        elif content == "truncated":  # the tiny checkpoint with its first shard cut short
            shutil.copytree(tiny_hf, path)
            shard = sorted(path.glob("*.safetensors"))[0]
            data = shard.read_bytes()
            shard.write_bytes(data[: len(data) - 100])
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def changes(before: dict[str, str], after: dict[str, str]) -> tuple[set[str], set[str], set[str]]:
    added = set(after) - set(before)
    removed = set(before) - set(after)
    changed = {k for k in set(before) & set(after) if before[k] != after[k]}
    return added, removed, changed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_early_with_problem_and_fix(case: Case, corpus):
    results, _ = corpus
    if case.mount and not can_mount():
        skip_or_fail("the disk cases mount a tmpfs in a mount namespace: they need root and util-linux's unshare")
    r = results[case.id]
    folder = str(Path(r["base"]).parent)
    out = r["out"]
    assert r["code"] == case.code, f"exit {r['code']}, want {case.code}:\n{out[-4000:]}"
    for says in case.says:
        assert says.replace("{case}", folder).replace("{base}", r["base"]) in out, out[-4000:]
    assert "fix:" in out and case.fix in out.split("fix:", 1)[1], out[-4000:]
    if not case.mid_run:  # a failure mid-run keeps its traceback, in the step's log that Snakemake shows
        assert "Traceback" not in out, out[-4000:]
        assert not re.search(r'^\s*File ".*", line \d+', out, re.M), out[-4000:]  # Snakemake's short traceback
    assert "sbatch" not in out and "fetch_config" not in out, out[-4000:]  # nothing asked Slurm for nodes
    added, removed, changed = changes(r["before"], r["after"])
    if case.step_output is None:  # refused when the config was read: not a byte written
        assert not (added or removed or changed), f"added {sorted(added)}, removed {sorted(removed)}, changed {sorted(changed)}"
    elif case.mid_run:  # it ran until the disk filled: nothing earlier touched, nothing that looks finished
        assert not removed and not changed, f"removed {sorted(removed)}, changed {sorted(changed)}"
        assert case.step_output not in r["after"]
        # A checkpoint at its final name is whole (checkpoints are staged under hidden names).
        finals = {}
        for a in added:
            if m := re.fullmatch(r"(runs/default/checkpoints/iter_\d{7})/(.+)", a):
                finals.setdefault(m.group(1), set()).add(m.group(2))
        assert finals and all(files >= WHOLE_CHECKPOINT for files in finals.values()), finals
    else:  # the step ran and refused: its log and the lock, its output not published
        assert not removed, sorted(removed)
        assert case.step_output not in r["after"]
        allowed = lambda p: p == ".glmsnake.lock" or re.fullmatch(r"logs/[^/]+\.log|runs/[^/]+/logs/attempt-\d+\.log", p)  # noqa: E731
        assert all(map(allowed, added | changed)), f"added {sorted(added)}, changed {sorted(changed)}"


def test_the_corpus_is_large_and_downloaded_nothing(corpus):
    results, downloads = corpus
    assert len(CASES) >= 60 and len(results) >= len([c for c in CASES if c.mount is None])
    assert downloads == [], downloads
    kinds = {c.run[0] for c in CASES}
    assert kinds == {"snakemake", "slurm", "glmsnake"}


def test_the_cli_finds_base_dir_from_any_directory(prepared, tmp_path):
    """A relative base_dir starts at the project folder, whichever directory the command runs in."""
    project, elsewhere = tmp_path / "my project", tmp_path / "elsewhere"
    (project / "config").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copytree(prepared, project / "results", symlinks=True)
    config = project / "config" / "config.yaml"
    config.write_text("base_dir: results\nruns: {default: {}}\n")
    glmsnake = str(Path(sys.executable).with_name("glmsnake"))
    env = {**os.environ, "COLUMNS": "300"}  # rich wraps at 80 columns without a terminal

    status = subprocess.run([glmsnake, "status", "--configfile", str(config)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, check=True).stdout
    for step, folder in (("weights", MODEL), ("torch_dist", f"{MODEL}_torch_dist"), ("fp8", f"{MODEL}-FP8")):
        assert f"{step:11s} done     {project / 'results' / folder}" in status, status
    plan = subprocess.run([glmsnake, "plan", "--configfile", str(config), "torch_dist"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    words = " ".join(plan.stdout.split())  # the table's title wraps
    assert f"base {project / 'results'})" in words and "(nothing)" in words, plan.stdout
    assert (project / ".snakemake").is_dir() and not (elsewhere / ".snakemake").exists()
    # A config kept elsewhere, run from the folder whose results/ holds the outputs: base_dir used
    # to mean the cwd; now it means the config's folder, and the outputs there are named, not redone.
    other = elsewhere / "exp.yaml"
    other.write_text("base_dir: results\nruns: {default: {}}\n")
    moved = subprocess.run([glmsnake, "status", "--configfile", str(other)], cwd=project, env=env,
                           capture_output=True, text=True)
    assert moved.returncode == 2 and "Traceback" not in moved.stderr, moved.stderr
    words = " ".join(moved.stderr.split())
    assert f"base_dir 'results' is {elsewhere / 'results'}" in words and f"but the outputs are in {project / 'results'}" in words
    assert f"fix: set base_dir: {project / 'results'}" in words
