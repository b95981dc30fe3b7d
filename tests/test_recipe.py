"""Recipe rendering: the 64xH100 preset holds every flag and value of slime's GLM-4.7 script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glmsnake import resolve
from glmsnake.recipe import driver, groups

# slime's run-glm4.7-355B-A32B.sh, group by group, as slime's scripts write them (data under base_dir /shared/glm).
EXPECTED = {
    "MODEL": "--disable-bias-linear --qk-layernorm --group-query-attention --num-attention-heads 96 --num-query-groups 8 --kv-channels 128 --num-layers 92 --hidden-size 5120 --ffn-hidden-size 12288 --add-qkv-bias --normalization RMSNorm --position-embedding-type rope --rotary-percent 0.5 --swiglu --untie-embeddings-and-output-weights --vocab-size 151552 --rotary-base 1000000 --moe-ffn-hidden-size 1536 --moe-shared-expert-intermediate-size 1536 --moe-router-pre-softmax --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 0 --moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall --moe-router-topk 8 --moe-router-topk-scaling-factor 2.5 --moe-layer-freq [0]*3+[1]*89 --num-experts 160 --moe-grouped-gemm --moe-router-dtype fp32 --moe-permute-fusion --moe-aux-loss-coeff 0 --mtp-num-layers 1",
    "ROLLOUT": "--prompt-data /shared/glm/data/prompt.jsonl --input-key prompt --label-key label --apply-chat-template --rollout-shuffle --rm-type deepscaler --num-rollout 3000 --rollout-batch-size 128 --n-samples-per-prompt 8 --rollout-max-response-len 32768 --rollout-temperature 1 --over-sampling-batch-size 256 --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std --num-steps-per-rollout 4 --balance-data --rollout-stop-token-ids 151329 151336 151338",
    "EVAL": "--eval-interval 20 --eval-prompt-data aime /shared/glm/data/aime.jsonl --n-samples-per-eval-prompt 8 --eval-max-response-len 32768 --eval-top-p 1",
    "PERF": "--tensor-model-parallel-size 8 --sequence-parallel --pipeline-model-parallel-size 4 --context-parallel-size 2 --expert-model-parallel-size 16 --expert-tensor-parallel-size 1 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 --use-dynamic-batch-size --max-tokens-per-gpu 16384",
    "GRPO": "--advantage-estimator gspo --kl-loss-coef 0.00 --kl-loss-type low_var_kl --kl-coef 0.00 --entropy-coef 0.00 --eps-clip 1e-4 --eps-clip-high 2e-4 --use-tis",
    "OPTIMIZER": "--optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98 --optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer",
    "SGLANG": "--rollout-num-gpus-per-engine 32 --sglang-mem-fraction-static 0.7 --sglang-enable-dp-attention --sglang-dp-size 4 --sglang-ep-size 32 --sglang-enable-dp-lm-head --sglang-moe-dense-tp-size 1 --sglang-speculative-algorithm EAGLE --sglang-speculative-num-steps 3 --sglang-speculative-eagle-topk 1 --sglang-speculative-num-draft-tokens 4",
    "MTP": "--enable-mtp-training --mtp-loss-scaling-factor 0.2",
    "MISC": "--attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32 --attention-softmax-in-fp32 --attention-backend flash --moe-token-dispatcher-type flex --moe-enable-deepep",
}
FP8_SGLANG = "--rollout-num-gpus-per-engine 32 --sglang-mem-fraction-static 0.7 --sglang-enable-dp-attention --sglang-dp-size 32 --sglang-ep-size 32 --sglang-moe-dense-tp-size 1 --sglang-enable-dp-lm-head --sglang-cuda-graph-bs 1 2 4 8 16 24 32 40 48 56 64 72 80 88 96 104 112 120 128 --sglang-speculative-algorithm EAGLE --sglang-speculative-num-steps 3 --sglang-speculative-eagle-topk 1 --sglang-speculative-num-draft-tokens 4 --sglang-moe-a2a-backend deepep --sglang-deepep-mode auto"


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


@pytest.mark.parametrize("group", sorted(EXPECTED))
def test_every_flag_and_value_of_the_seed(recipe, group):
    assert as_flags(groups(recipe, "grpo")[group]) == as_flags(EXPECTED[group].split())


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
    spec_only = resolve.load({"preset": "glm4.7-355b-64xh100", "runs": {"r": {"features": {"mtp_training": False}}}})
    g = groups(spec_only, "r")
    assert g["MTP"] == [] and "--mtp-num-layers" in g["MODEL"] and "--sglang-speculative-algorithm" in g["SGLANG"]


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
    script_order = ["MODEL", ckpt, "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "SGLANG", "MTP", "MISC"]
    expected = " ".join(EXPECTED.get(g, g) for g in script_order).split()
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
    assert int(n) == len(EXPECTED["MODEL"].split())
