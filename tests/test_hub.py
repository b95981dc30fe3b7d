"""The weights step against a real huggingface_hub client and a hub endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmsnake import config, hub, resolve
from glmsnake.steps import weights
from glmsnake.errors import GlmsnakeError

REPO_ID = "zai-org/Tiny-GLM"


def workflow(tmp_path: Path, source: str, **over) -> config.Workflow:
    return resolve.load({"base_dir": str(tmp_path / "base"), "overrides": {"weights": {"source": source}, **over}})


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under a folder: proof that nothing was touched."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def test_download_verifies_every_file_and_writes_manifest(tmp_path, hub_repo):
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main")
    sentinel = wf.paths.hf_manifest
    weights.download_hf(wf, sentinel)

    manifest = json.loads(sentinel.read_text())
    served = sorted(p.name for p in hub_repo.iterdir())
    assert sorted(manifest["files"]) == served
    assert manifest["commit"] == "a" * 40 and manifest["revision"] == "main"
    for name, meta in manifest["files"].items():
        assert (wf.paths.hf_dir / name).read_bytes() == (hub_repo / name).read_bytes()
        assert meta["size"] == (hub_repo / name).stat().st_size
    assert manifest["total_bytes"] == sum(m["size"] for m in manifest["files"].values())


def test_dropped_connection_resumes_with_range(tmp_path, hub_server, hub_repo, monkeypatch):
    from huggingface_hub import constants

    # The client keeps whole chunks only (10 MB by default); the tiny shards need small ones.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    shard = "model-00002-of-00003.safetensors"
    hub_server.state.drop_after[shard] = 5000
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main")
    hub_module_step(wf)
    ranges = hub_server.gets(shard)
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 5000, ranges
    assert (wf.paths.hf_dir / shard).read_bytes() == (hub_repo / shard).read_bytes()


def test_rerun_after_failure_fetches_only_missing_files(tmp_path, hub_server, hub_repo):
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main")
    bad = "model-00003-of-00003.safetensors"
    hub_server.state.corrupt.add(bad)
    with pytest.raises(GlmsnakeError, match=f"{bad}: sha256"):
        hub_module_step(wf)
    assert not (wf.paths.hf_manifest).exists()

    hub_server.state.corrupt.clear()
    hub_server.state.requests.clear()
    hub_module_step(wf)
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub_server.state.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {bad}, "files verified in the first attempt must not be downloaded again"


def test_corrupted_file_is_rejected_and_named(tmp_path, hub_server, hub_repo):
    hub_server.state.corrupt.add("config.json")
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main")
    with pytest.raises(GlmsnakeError) as e:
        hub_module_step(wf)
    assert "config.json: git blob id differs" in str(e.value)
    assert "fix:" in str(e.value)
    assert not (wf.paths.hf_manifest).exists()
    assert not (wf.paths.hf_dir / "config.json").exists(), "the bad copy is removed so a rerun fetches it again"


def test_unknown_revision_is_a_clear_error_and_writes_nothing(tmp_path, hub_server, hub_repo):
    wf = workflow(tmp_path, f"hf://{REPO_ID}@no-such-branch")
    with pytest.raises(GlmsnakeError, match="revision 'no-such-branch' does not exist in model repo zai-org/Tiny-GLM"):
        hub_module_step(wf)
    assert not wf.paths.hf_dir.exists()


def test_local_source_is_verified_and_linked_not_copied(tmp_path, tiny_hf):
    wf = workflow(tmp_path, f"local:{tiny_hf}")
    before = snapshot(tiny_hf)
    hub_module_step(wf)
    manifest = json.loads((wf.paths.hf_manifest).read_text())
    assert manifest["path"] == str(tiny_hf.resolve())
    shard = wf.paths.hf_dir / "model-00001-of-00003.safetensors"
    assert shard.is_symlink() and shard.resolve() == (tiny_hf / shard.name).resolve()
    assert manifest["files"][shard.name]["sha256"] == hub.atomic.sha256_file(tiny_hf / shard.name)
    assert snapshot(tiny_hf) == before


def test_local_source_with_missing_shard(tmp_path, tiny_hf):
    src = shutil.copytree(tiny_hf, tmp_path / "weights")
    (src / "model-00002-of-00003.safetensors").unlink()
    before = snapshot(src)
    wf = workflow(tmp_path, f"local:{src}")
    with pytest.raises(GlmsnakeError, match=r"lacks 1 shard\(s\) named in model.safetensors.index.json: model-00002-of-00003"):
        hub_module_step(wf)
    assert snapshot(src) == before and not wf.paths.hf_dir.exists()


def test_local_source_with_truncated_shard(tmp_path, tiny_hf):
    src = shutil.copytree(tiny_hf, tmp_path / "weights")
    shard = src / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    wf = workflow(tmp_path, f"local:{src}")
    with pytest.raises(GlmsnakeError, match="model-00003-of-00003.safetensors is .* bytes but its header describes"):
        hub_module_step(wf)
    assert not wf.paths.hf_dir.exists()


def test_base_dir_not_writable(tmp_path):
    # /proc refuses new folders even to root, who ignores permission bits.
    wf = resolve.load({"base_dir": "/proc/glmsnake-test/base"})
    with pytest.raises(GlmsnakeError, match="(?s)cannot write under /proc/glmsnake-test/base.*set base_dir to a writable folder"):
        hub_module_step(wf)


def test_tiny_source_is_deterministic(tmp_path):
    a, b = workflow(tmp_path / "a", "tiny"), workflow(tmp_path / "b", "tiny")
    hub_module_step(a)
    hub_module_step(b)
    ma = json.loads((a.paths.hf_manifest).read_text())["files"]
    mb = json.loads((b.paths.hf_manifest).read_text())["files"]
    assert ma == mb
    assert not any(p.name.endswith(".partial") for p in a.base.iterdir())


def test_dataset_from_the_hub(tmp_path, hub_server):
    data = tmp_path / "ds"
    data.mkdir()
    (data / "dapo-math-17k.jsonl").write_text('{"prompt": "1+1?", "label": "2"}\n')
    hub_server.add_repo("zhuzilin/dapo-math-17k", data, repo_type="dataset")
    wf = resolve.load(
        {
            "base_dir": str(tmp_path / "base"),
            "overrides": {"datasets": {"prompt": {"source": "hf://datasets/zhuzilin/dapo-math-17k@main", "file": "dapo-math-17k.jsonl"}}},
        }
    )
    out = wf.paths.dataset("prompt")
    weights.download_dataset(wf, out, name="prompt")
    assert out.read_text() == '{"prompt": "1+1?", "label": "2"}\n'
    assert any("/api/datasets/zhuzilin/dapo-math-17k/" in p for _, p, _ in hub_server.state.requests)


# --------------------------------------------------------------------------- helpers


def hub_module_step(wf: config.Workflow) -> None:
    weights.download_hf(wf, wf.paths.hf_manifest)


@pytest.fixture
def hub_repo(hub_server, tiny_hf) -> Path:
    hub_server.add_repo(REPO_ID, tiny_hf)
    return tiny_hf


def test_from_hf_fetches_config_json_alone_before_the_download(tmp_path, hub_repo, hub_server):
    """`model: from_hf` with hub weights: before the download only config.json is fetched (once,
    kept under base_dir); after it, the downloaded folder's config.json is read."""
    over = {"model": "from_hf"}
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main", **over)
    # The tiny model's args, with slime's fusions on and Megatron's default norm epsilon left unsaid.
    assert wf.preset.model == resolve.load({}).preset.model.model_copy(update={
        "moe_grouped_gemm": True, "moe_permute_fusion": True, "norm_epsilon": None})
    fetched = [p for _, p, _ in hub_server.state.requests if "/resolve/" in p]
    assert fetched and all(p.endswith("/config.json") for p in fetched), fetched
    cached = list((tmp_path / "base" / ".hub-configs").glob("*.config.json"))
    assert [p.name for p in cached] == ["zai-org--Tiny-GLM@main.config.json"]
    assert not wf.paths.hf_dir.exists()
    hub_server.state.requests.clear()
    workflow(tmp_path, f"hf://{REPO_ID}@main", **over)  # loading again asks the hub nothing
    assert hub_server.state.requests == []
    weights.download_hf(wf, wf.paths.hf_manifest)
    cached[0].unlink()
    hub_server.state.requests.clear()
    assert workflow(tmp_path, f"hf://{REPO_ID}@main", **over).preset.model == wf.preset.model
    assert hub_server.state.requests == [], "after the download the downloaded config.json is read"


def test_weights_of_another_model_are_refused_right_after_the_download(tmp_path, hub_repo):
    wf = workflow(tmp_path, f"hf://{REPO_ID}@main", model={"num_experts": 16})
    with pytest.raises(GlmsnakeError) as e:
        weights.download_hf(wf, wf.paths.hf_manifest)
    assert "n_routed_experts: config.json has 8, MODEL args say 16" in e.value.problem
    assert not wf.paths.hf_manifest.exists() and (wf.paths.hf_dir / "config.json").is_file()  # files kept
