"""Which jobs a change schedules, written out by hand: the README's staleness table as a test.

One real run of the whole tiny DAG (local weights, so an architecture change cannot hide behind
regenerated tiny weights), then one `snakemake -n all` per kind of change. The expected job sets
are literals, never computed from glmsnake.staleness, so a staleness key that forgets a setting
(or takes in one it must not) fails here.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, snakemake
from test_workflow import jobs_of

TRAIN = {"train_run", "export_hf"}
AGGREGATES = {"all", "train", "weights", "torch_dist", "fp8", "provenance"}  # provenance follows every sentinel


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_hf):
    """The whole DAG of the tiny preset, for real, with `local:` weights."""
    import shutil

    wd = tmp_path_factory.mktemp("table")
    base = wd / "results"
    local = shutil.copytree(tiny_hf, wd / "weights")  # its own copy: one test changes it in place
    weights = f"overrides={{weights: {{source: 'local:{local}'}}}}"
    snakemake(wd, "--profile", str(REPO / "profiles/local"), "all", "--config", f"base_dir={base}", weights)
    return wd, base, weights


def scheduled(finished, *config: str) -> set[str]:
    wd, base, weights = finished
    # A later `overrides=` replaces the first one on Snakemake's command line: repeat the weights.
    cfg = [c if not c.startswith("overrides={") else c.replace("overrides={", "overrides={" + weights[11:-1] + ", ", 1)
           for c in config]
    if not any(c.startswith("overrides=") for c in cfg):
        cfg.append(weights)
    out = snakemake(wd, "-n", "all", "--config", f"base_dir={base}", *cfg).stdout
    return set(jobs_of(out)) - AGGREGATES


CASES = [
    # (what changed, --config values, the jobs that must run)
    ("nothing", [], set()),
    ("FP8 strategy", ["overrides={convert: {fp8: {strategy: channel}}}"], {"convert_fp8"}),
    ("FP8 block size", ["overrides={convert: {fp8: {block_size: [16, 16]}}}"], {"convert_fp8"}),
    ("FP8 workers", ["overrides={convert: {fp8: {workers: 1}}}"], set()),
    ("torch_dist writer layout", ["overrides={convert: {torch_dist: {layout: te}}}"], {"convert_torch_dist", *TRAIN}),
    # A MODEL arg config.json does not state (a changed one it states is refused at load: tests/test_bad_input.py).
    ("architecture, same local weights", ["overrides={model: {norm_epsilon: 1.0e-6}}"],
     {"convert_torch_dist", *TRAIN}),
    ("a dataset entry", ["overrides={datasets: {eval: {source: tiny, file: other.jsonl}}}"],
     {"download_dataset", *TRAIN}),
    ("torch_dist writer count", ["overrides={convert: {torch_dist: {writers_per_node: 2}}}"], set()),
    ("torch_dist allocation", ["overrides={convert: {torch_dist: {allocation: {nodes: 1}}}}"], set()),
    ("torch_dist backend", ["overrides={convert: {torch_dist: {backend: slime}}}"], set()),
    ("training parallelism", ["runs={default: {perf: {tensor_model_parallel_size: 2}}}"], TRAIN),
    ("rollout group", ["runs={default: {rollout: {rollout_temperature: 0.9}}}"], TRAIN),
    ("eval group", ["runs={default: {eval: {eval_interval: 16}}}"], TRAIN),
    ("perf group", ["runs={default: {perf: {micro_batch_size: 16}}}"], TRAIN),
    ("grpo group", ["runs={default: {grpo: {eps_clip: 0.25}}}"], TRAIN),
    ("optimizer group", ["runs={default: {optimizer: {lr: 0.02}}}"], TRAIN),
    ("sglang group", ["runs={default: {sglang: {mem_fraction_static: 0.5}}}"], TRAIN),
    ("mtp group", ["runs={default: {mtp: {mtp_loss_scaling_factor: 0.3}}}"], TRAIN),
    ("misc group", ["runs={default: {misc: {attention_dropout: 0.1}}}"], TRAIN),
    ("features group", ["runs={default: {features: {fp8_rollout: true}}}"], TRAIN),
    ("train group: seed", ["runs={default: {train: {seed: 7}}}"], TRAIN),
    ("train group: colocate", ["runs={default: {train: {colocate: false}}}"], TRAIN),
    ("save_interval", ["runs={default: {train: {save_interval: 8}}}"], set()),
    ("max_requeues", ["runs={default: {train: {max_requeues: 0}}}"], set()),
    ("keep_checkpoints", ["runs={default: {train: {keep_checkpoints: {last: 1, every: 10}}}}"], set()),
    ("training allocation", ["runs={default: {train: {allocation: {time_min: 60}}}}"], set()),
    ("slime and Megatron checkouts", ["runs={default: {train: {slime_dir: /opt/slime, megatron_dir: /opt/mlm}}}"], set()),
]


@pytest.mark.parametrize("what, config, expected", CASES, ids=[c[0] for c in CASES])
def test_a_change_schedules_exactly(finished, what, config, expected):
    assert scheduled(finished, *config) == expected, what


def test_other_weights_rebuild_everything(finished, tmp_path, tiny_hf):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_hf, other)
    got = scheduled(finished, f"overrides={{weights: {{source: 'local:{other}'}}}}")
    assert got == {"download_hf", "convert_torch_dist", "convert_fp8", *TRAIN}


def test_local_weights_changed_in_place_rebuild_everything(finished):
    wd, _, _ = finished
    shard = wd / "weights" / "model-00001-of-00003.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert scheduled(finished) == {"download_hf", "convert_torch_dist", "convert_fp8", *TRAIN}
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert scheduled(finished) == set()


def test_sentinels_record_the_settings_that_made_them(finished):
    wd, base, _ = finished
    tiny_hf = wd / "weights"

    def settings(path: str) -> dict:
        return json.loads((base / path).read_text())["settings"]

    weights = settings("tiny-glm4moe/glmsnake.manifest.json")
    assert {k: v for k, v in weights.items() if k != "identity"} == {
        "source": f"local:{tiny_hf}",
        "allow_patterns": ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja"],
    }
    shard = "model-00001-of-00003.safetensors"
    assert weights["identity"][shard] == [(tiny_hf / shard).stat().st_size, (tiny_hf / shard).stat().st_mtime_ns]
    assert settings("tiny-glm4moe-FP8/glmsnake.done.json") == {"strategy": "block", "block_size": [32, 32]}
    td = settings("tiny-glm4moe_torch_dist/glmsnake.done.json")
    assert set(td) == {"architecture"}
    assert {k: td["architecture"][k] for k in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                                               "moe_ffn_hidden_size", "vocab_size", "moe_layer_freq")} == {
        "num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
        "moe_ffn_hidden_size": 32, "vocab_size": 128, "moe_layer_freq": "[0]*1+[1]*2"}
    train = settings("runs/default/glmsnake.done.json")
    assert train["optimizer"]["lr"] == 0.01 and train["rollout"]["num_rollout"] == 32
    assert train["train"] == {"backend": "local", "colocate": True, "seed": 1234}
    assert "fp8" not in train and train["architecture"] == td["architecture"]
    assert settings("runs/default/hf/glmsnake.done.json") == {"architecture": td["architecture"]}
