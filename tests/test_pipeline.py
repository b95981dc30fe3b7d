"""The README's main job, end to end on the tiny preset with the local profile, then staleness.

One real `snakemake --profile profiles/local all` run (every rule), then dry runs
that must schedule exactly the steps a change touches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_local, snakemake
from test_workflow import jobs_of


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pipeline")
    # A space, a quote and a `$` in base_dir: every value a rule puts in a shell line is quoted.
    return wd, run_local(wd, "all", base_name="glm results'$1")


def dry(pipeline, *config: str) -> dict[str, int]:
    wd, base = pipeline
    return jobs_of(snakemake(wd, "-n", "all", "--config", f"base_dir={base}", *config).stdout)


def test_every_rule_ran_and_left_its_sentinel(pipeline):
    _, base = pipeline
    run = base / "runs/default"
    for sentinel in (base / "tiny-glm4moe/glmsnake.manifest.json", base / "tiny-glm4moe_torch_dist/glmsnake.done.json",
                     base / "tiny-glm4moe-FP8/glmsnake.done.json", run / "glmsnake.done.json", run / "hf/glmsnake.done.json"):
        assert json.loads(sentinel.read_text())
    done = json.loads((run / "glmsnake.done.json").read_text())
    assert done["final_iteration"] == 31 and (run / "checkpoints/iter_0000031").is_dir()
    assert (run / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(base.rglob(".*.partial")), "no staging folder is left behind"


def test_exported_model_loads_in_transformers(pipeline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, base = pipeline
    hf = base / "runs/default/hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    ids = AutoTokenizer.from_pretrained(hf)("say a:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # Training changed the weights: the export is not the initial checkpoint.
    init = AutoModelForCausalLM.from_pretrained(base / "tiny-glm4moe", dtype=torch.bfloat16)
    assert not torch.equal(init.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_the_mla_sibling_runs_through_every_rule(tmp_path):
    """tiny-mla (GLM-4.7-Flash's architecture) through download, torch_dist, FP8, local training
    and export: the export is a trained glm4_moe_lite that transformers loads."""
    import torch
    from transformers import AutoModelForCausalLM

    wd = tmp_path
    base = wd / "results"
    snakemake(wd, "--profile", str(REPO / "profiles/local"), "all", "--config", f"base_dir={base}", "preset=tiny-mla")
    run = base / "runs/default"
    for sentinel in (base / "tiny-glm4moe-lite/glmsnake.manifest.json", base / "tiny-glm4moe-lite-FP8/glmsnake.done.json",
                     run / "glmsnake.done.json", run / "hf/glmsnake.done.json"):
        assert json.loads(sentinel.read_text())
    td = json.loads((base / "tiny-glm4moe-lite_torch_dist/glmsnake.done.json").read_text())
    assert td["layout"] == {"norms": "local", "experts": "stacked"}
    assert "decoder.layers.0.self_attention.linear_kv_down_proj.weight" in td["tensors"]
    assert json.loads((run / "glmsnake.done.json").read_text())["final_iteration"] == 31
    model = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.bfloat16)
    init = AutoModelForCausalLM.from_pretrained(base / "tiny-glm4moe-lite", dtype=torch.bfloat16)
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM"
    attn, attn0 = model.model.layers[0].self_attn, init.model.layers[0].self_attn
    assert not torch.equal(attn.kv_b_proj.weight, attn0.kv_b_proj.weight), "training changed the MLA weights"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_status_shows_the_finished_run(pipeline):
    wd, base = pipeline
    cfg = wd / "config.yaml"
    cfg.write_text((REPO / "config/config.yaml").read_text().replace("base_dir: results", f"base_dir: {base}"))
    out = subprocess.run([sys.executable, "-m", "glmsnake.cli", "status", "--configfile", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("│ default "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[:2] == ["default", "local"] and cells[3] == "32/32" and cells[6] == "iter 31 (finished)", row
    assert float(cells[4]) > 0 and cells[5].startswith("eval ") and cells[7].startswith("3 (") and cells[8] == "-"


def test_status_watch_refreshes_until_ctrl_c(pipeline):
    import signal

    wd, base = pipeline
    cfg = wd / "config.yaml"
    cfg.write_text((REPO / "config/config.yaml").read_text().replace("base_dir: results", f"base_dir: {base}"))
    # A shell's background job starts with SIGINT ignored (so does this test under a backgrounded CI
    # run), and Python then keeps it ignored: give the command the default, as a terminal's Ctrl-C has.
    proc = subprocess.Popen([sys.executable, "-m", "glmsnake.cli", "status", "--configfile", str(cfg), "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # past its start-up, watching
    assert proc.poll() is None  # still watching
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "│ default " in out and "32/32" in out


def test_rerun_does_nothing(pipeline):
    assert dry(pipeline) == {}


def test_training_knob_reruns_train_and_export_only(pipeline):
    assert dry(pipeline, "runs={default: {optimizer: {lr: 0.02}}}") == {"train_run": 1, "export_hf": 1, "provenance": 1, "all": 1}


def test_turning_on_wandb_and_tensorboard_reruns_nothing(pipeline):
    assert dry(pipeline, "runs={default: {tracking: {use_wandb: true, wandb_project: p, use_tensorboard: true}}}") == {}


def test_save_interval_alone_reruns_nothing(pipeline):
    assert dry(pipeline, "runs={default: {train: {save_interval: 8}}}") == {}


def test_fp8_block_size_reruns_fp8_and_with_fp8_rollout_train(pipeline):
    assert dry(pipeline, "overrides={convert: {fp8: {block_size: [64, 64]}}}") == {"convert_fp8": 1, "provenance": 1, "all": 1}
    jobs = dry(pipeline, "overrides={convert: {fp8: {block_size: [64, 64]}}}", "runs={default: {features: {fp8_rollout: true}}}")
    assert jobs == {"convert_fp8": 1, "train_run": 1, "export_hf": 1, "provenance": 1, "all": 1}


def test_resource_planner_predicts_the_tiny_outputs_within_5_percent(pipeline):
    from glmsnake import disk, resolve
    from glmsnake.resources import planner, storage

    _, base = pipeline
    wf = resolve.load({"base_dir": str(base)})
    m, paths, run = wf.preset.model, wf.paths, wf.runs["default"]
    newest = max(paths.run("default").checkpoints.glob("iter_*"))
    for folder, predicted in ((paths.hf_dir, storage.hf_bytes(m)), (paths.torch_dist_dir, storage.torch_dist_bytes(m)),
                              (paths.fp8_dir, storage.fp8_bytes(m, wf.preset.convert.fp8.block_size)),
                              (newest, storage.checkpoint_bytes(m, run)), (paths.run("default").hf, storage.hf_bytes(m))):
        real = disk.bytes_under(folder)
        assert abs(predicted - real) / real < 0.05, (folder, predicted, real)
    kept = len(list(paths.run("default").checkpoints.glob("iter_*")))
    assert kept == run.train.keep_checkpoints.last  # what the estimate holds, less the one being written
    plan = planner.plan_resources(wf)
    assert plan.disk_pending == 0 and all(t.name.endswith("(written)") for t in plan.disk.terms)


# What a user clicks to see the curves (Results, then the training category, then the image),
# done by the report's own functions once the page has loaded.
CLICKS = """<script>window.addEventListener("load", () => setTimeout(() => {
  const [path, entry] = Object.entries(results).find(([p]) => p.endsWith("train_curves.png"));
  app.showCategory("training");
  app.setView({content: "img", contentPath: entry.data_uri, resultPath: path});
}, 300));</script>"""


def test_snakemake_report_shows_the_curves_in_a_browser(pipeline, tmp_path):
    import base64
    import re
    import shutil

    from PIL import Image

    from conftest import skip_or_fail

    chromium = shutil.which("chromium")
    if chromium is None:
        skip_or_fail("the report test looks at the page with Debian's chromium (apt install chromium; .ci/setup does)")
    wd, base = pipeline
    report = tmp_path / "report.html"
    snakemake(wd, "--report", str(report), "--config", f"base_dir={base}")
    raw = report.read_text()
    for rule in ("download_hf", "convert_torch_dist", "convert_fp8", "train_run", "export_hf", "provenance"):
        assert rule in raw, rule  # the rule graph
    page = tmp_path / "clicked.html"
    page.write_text(raw[:raw.rindex("</body>")] + CLICKS + raw[raw.rindex("</body>"):])
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, "--window-size=1400,1000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180)
    # The page shows the training curves themselves: the run's PNG, rendered as an image.
    shown = re.search(r'<img[^>]*src="data:image/png;[^",]*base64,([^"]+)"', dom)
    assert shown, dom[-3000:]
    assert base64.b64decode(shown.group(1)) == (base / "runs/default/train_curves.png").read_bytes()
    assert "train_curves.png" in dom and "provenance.html" in raw and "What RL users watch" in raw
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1000) and len(img.getcolors(maxcolors=1 << 20)) > 200  # curves, not a blank page
    # Provenance from the sentinels: every step, with its timing and versions.
    prov = (base / "report/provenance.html").read_text()
    for step in ("download_hf", "convert_torch_dist", "convert_fp8", "train_run [default]", "export_hf [default]"):
        assert f"<td>{step}</td>" in prov, step
    assert "torch 2." in prov and "ray 2." in prov
