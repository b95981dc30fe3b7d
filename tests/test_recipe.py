"""Recipe rendering: the 64xH100 preset holds every flag and value of slime's GLM-4.7 script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmsnake import resolve
from glmsnake.errors import GlmsnakeError
from glmsnake.recipe import driver, groups

SLIME = json.loads((Path(__file__).parent / "fixtures" / "slime_scripts.json").read_text())
GROUPS = ("MODEL", "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "SGLANG", "MTP", "MISC")
DATA_FLAGS = ("--prompt-data", "--eval-prompt-data")  # slime's paths there, glmsnake's in base_dir
# The seed recipe's FP8 rollout: block FP8 weights, DeepEP, DP attention over all 32 GPUs of an engine.
FP8_SGLANG = "--rollout-num-gpus-per-engine 32 --sglang-mem-fraction-static 0.7 --sglang-enable-dp-attention --sglang-dp-size 32 --sglang-ep-size 32 --sglang-moe-dense-tp-size 1 --sglang-enable-dp-lm-head --sglang-cuda-graph-bs 1 2 4 8 16 24 32 40 48 56 64 72 80 88 96 104 112 120 128 --sglang-speculative-algorithm EAGLE --sglang-speculative-num-steps 3 --sglang-speculative-eagle-topk 1 --sglang-speculative-num-draft-tokens 4 --sglang-moe-a2a-backend deepep --sglang-deepep-mode auto"


def expected(preset: str, group: str) -> dict[str, tuple]:
    """The script's flags of a group with the preset's stated changes (fixture: `presets.<name>.changes`)."""
    spec = SLIME["presets"][preset]
    flags = as_flags(SLIME["scripts"][spec["script"]][group].split())
    for flag, values in spec["changes"].get(group, {}).items():
        if values is None:
            flags.pop(flag)
        else:
            flags[flag] = as_flags([flag, *values])[flag]
    return flags


def rendered(wf, group: str) -> dict[str, tuple]:
    """What glmsnake renders, less flags at slime's or Megatron's own default (fixture: `defaults`)."""
    flags = as_flags(groups(wf, "default")[group])
    for flag, values in SLIME["defaults"].items():
        if flag.startswith("--") and flags.get(flag) == as_flags([flag, *values])[flag]:
            flags.pop(flag)
    return flags


@pytest.mark.parametrize("preset", sorted(SLIME["presets"]))
@pytest.mark.parametrize("group", GROUPS)
def test_every_flag_and_value_of_slimes_script(preset, group):
    wf = resolve.load({"preset": preset, "base_dir": "/shared/glm"})
    have, want = rendered(wf, group), expected(preset, group)
    for flag in DATA_FLAGS:
        assert (flag in have) == (flag in want)
        have.pop(flag, None), want.pop(flag, None)
    assert have == want


@pytest.mark.parametrize("preset", sorted(SLIME["presets"]))
def test_launch_flags_follow_the_script(preset):
    wf = resolve.load({"preset": preset, "base_dir": "/shared/glm"})
    spec = SLIME["presets"][preset]
    want = as_flags(SLIME["scripts"][spec["script"]]["launch"].split())
    for flag, values in spec["changes"].get("launch", {}).items():
        want[flag] = as_flags([flag, *values])[flag]
    argv = driver(wf, "default", head_address="10.1.2.3", interface=None).argv
    assert as_flags(argv[2:7]) == want


def test_the_flash_scripts_one_node_layout_is_refused_before_allocation():
    """slime's Flash script keeps PP 2 with EP 8; on one node of 8 GPUs Megatron stops at start-up.
    The preset says why it uses PP 1; setting the script's layout back is refused, with the fix."""
    with pytest.raises(GlmsnakeError) as e:
        resolve.load({"preset": "glm4.7-flash-8xh100", "overrides": {"perf": {
            "pipeline_model_parallel_size": 2, "decoder_last_pipeline_num_layers": 23}}})
    assert "EP x ETP = 8x1 = 8 does not divide the expert-parallel world of 4 GPUs per pipeline stage" in e.value.problem


def as_flags(args: list[str]) -> dict[str, tuple]:
    """{flag: values}, numbers compared as numbers (slime writes 0.00, we write 0.0)."""

    def norm(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    out: dict[str, tuple] = {}
    flag = None
    for a in args:
        if a.startswith("--"):
            flag = a
            out[flag] = ()
        else:
            out[flag] = out[flag] + (norm(a),)
    return out


def in_order(args: list[str]) -> list[tuple]:
    """[(flag, values)] in order, numbers compared as numbers."""
    out: list[tuple] = []
    for a in args:
        if a.startswith("--"):
            out.append((a, ()))
        else:
            out[-1] = (out[-1][0], out[-1][1] + (_num(a),))
    return out


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return resolve.load({"preset": "glm4.7-355b-64xh100", "base_dir": "/shared/glm", "runs": {"grpo": {}, "fp8": {"features": {"fp8_rollout": True}}}})


def test_checkpoint_and_data_paths(recipe):
    g = groups(recipe, "grpo")
    assert as_flags(g["CKPT"]) == {
        "--hf-checkpoint": ("/shared/glm/GLM-4.7-355B-A32B",),
        "--ref-load": ("/shared/glm/GLM-4.7-355B-A32B_torch_dist",),
        "--load": ("/shared/glm/runs/grpo/checkpoints",),
        "--save": ("/shared/glm/runs/grpo/checkpoints",),
        "--save-interval": (20.0,),
    }
    assert g["ROLLOUT"][:2] == ["--prompt-data", "/shared/glm/data/prompt.jsonl"]
    assert as_flags(g["EVAL"])["--eval-prompt-data"] == ("aime", "/shared/glm/data/aime.jsonl")


def test_fp8_rollout_switches_checkpoint_and_sglang(recipe):
    g = groups(recipe, "fp8")
    assert as_flags(g["CKPT"])["--hf-checkpoint"] == ("/shared/glm/GLM-4.7-355B-A32B-FP8",)
    assert as_flags(g["SGLANG"]) == as_flags(FP8_SGLANG.split())


def test_mtp_toggles():
    off = resolve.load({"preset": "glm4.7-355b-64xh100", "runs": {"r": {"features": {"mtp_training": False, "mtp_speculative_decoding": False}}}})
    g = groups(off, "r")
    assert g["MTP"] == [] and "--mtp-num-layers" not in g["MODEL"]
    assert not any(a.startswith("--sglang-speculative") for a in g["SGLANG"])
    # The script's default: EAGLE drafts with the checkpoint's MTP layer, Megatron does not load it.
    g = groups(resolve.load({"preset": "glm4.7-355b-64xh100"}), "default")
    assert g["MTP"] == [] and "--mtp-num-layers" not in g["MODEL"] and "--sglang-speculative-algorithm" in g["SGLANG"]
    trained = resolve.load({"preset": "glm4.7-355b-64xh100", "runs": {"r": {"features": {"mtp_training": True}}}})
    g = groups(trained, "r")
    assert as_flags(g["MODEL"])["--mtp-num-layers"] == (1.0,)
    assert g["MTP"] == ["--enable-mtp-training", "--mtp-loss-scaling-factor", "0.2"]


def test_driver_command_and_runtime_env(recipe):
    d = driver(recipe, "grpo", head_address="10.1.2.3", interface="ib0")
    assert d.argv[:7] == ["python3", "train.py", "--actor-num-nodes", "8", "--actor-num-gpus-per-node", "8", "--colocate"]
    assert d.cwd == "/root/slime"
    assert d.env["PYTHONPATH"] == "/root/Megatron-LM"
    assert d.env["no_proxy"] == "localhost,127.0.0.1,10.1.2.3" and d.env["MASTER_ADDR"] == "10.1.2.3"
    assert d.env["GLOO_SOCKET_IFNAME"] == d.env["TP_SOCKET_IFNAME"] == "ib0"
    assert d.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and d.env["NVSHMEM_DISABLE_NCCL"] == "1"
    assert d.env["NCCL_NVLS_ENABLE"] == "0"
    # Every group's arguments, in the order of slime's script, follow the launch flags.
    ckpt = ("--hf-checkpoint /shared/glm/GLM-4.7-355B-A32B --ref-load /shared/glm/GLM-4.7-355B-A32B_torch_dist "
            "--load /shared/glm/runs/grpo/checkpoints --save /shared/glm/runs/grpo/checkpoints --save-interval 20")
    script = {g: v.replace("$BASE_DIR/dapo-math-17k/dapo-math-17k.jsonl", "/shared/glm/data/prompt.jsonl")
                 .replace("$BASE_DIR/rl_data/aime-2024.jsonl", "/shared/glm/data/aime.jsonl")
              for g, v in SLIME["scripts"]["run-glm4.7-355B-A32B.sh"].items()}
    script_order = ["MODEL", ckpt, "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "SGLANG", "MTP", "MISC"]
    expected = " ".join(script.get(g, g) for g in script_order).split()
    assert in_order(d.argv[7:]) == in_order(expected)


def test_render_command_prints_groups_as_bash_arrays():
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "render", "--preset", "glm4.7-355b-64xh100"], capture_output=True, text=True, check=True)
    out = proc.stdout
    for group in ("MODEL", "CKPT", "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "SGLANG", "MTP", "MISC"):
        assert f"{group}_ARGS=(" in out
    assert "   --moe-layer-freq '[0]*3+[1]*89'" in out
    # The arrays are valid bash: source them and count MODEL_ARGS.
    script = out.split("# runtime env")[0] + 'echo "${#MODEL_ARGS[@]}"'
    n = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert int(n) == len(SLIME["scripts"]["run-glm4.7-355B-A32B.sh"]["MODEL"].split())
