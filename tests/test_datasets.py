"""A prompt set is checked twice: its path when the config is loaded (exists, a file, not empty), its
content by the step that publishes it, every mistake named with its file and line; nothing is
written (an earlier copy stays as it was)."""

from __future__ import annotations

import pytest

from glmsnake import resolve
from glmsnake.errors import GlmsnakeError
from glmsnake.steps import weights

GOOD = '{"prompt": "1+1=", "label": "2"}\n'

AT_LOAD = [
    # (what the file holds (None: no file, "dir": a folder), what the error says)
    (None, "does not exist"),
    ("dir", "is a folder, not a .jsonl file"),
    ("", "is empty"),
]


def write_source(src, content):
    if content == "dir":
        src.mkdir()
    elif content is not None:
        src.write_bytes(content.encode("utf-8", "surrogateescape"))


def config_with(tmp_path, src) -> dict:
    return {"base_dir": str(tmp_path / "base"), "overrides": {"datasets": {"prompt": {"source": f"local:{src}"}}}}


@pytest.mark.parametrize("content, says", AT_LOAD, ids=[c[1] for c in AT_LOAD])
def test_a_local_dataset_path_that_cannot_work_is_refused_when_the_config_loads(tmp_path, content, says):
    src = tmp_path / "my prompts.jsonl"
    write_source(src, content)
    with pytest.raises(GlmsnakeError) as e:
        resolve.load(config_with(tmp_path, src))
    assert f"datasets.prompt: local {src} {says}" in str(e.value) and "fix:" in str(e.value)
    assert not (tmp_path / "base").exists()


CASES = AT_LOAD[:2] + [
    # the file changed after the config was loaded, or its content is wrong: the step says so
    ("", "no rows"),
    ("\n\n", "no rows"),
    (GOOD + '{"prompt": "2+2=", "label": \n', ":2: not JSON (Expecting value"),
    (GOOD + '["a", "b"]\n', ":2: a JSON list, not an object"),
    (GOOD + '{"question": "2+2=", "label": "4"}\n', ":2: no 'prompt' (it has ['label', 'question'])"),
    (GOOD + '{"prompt": "2+2="}\n', ":2: no 'label'"),
    ("\udcff", "is not UTF-8 text"),
]


@pytest.mark.parametrize("content, says", CASES, ids=[c[1][:30] for c in CASES])
def test_a_broken_local_dataset_is_refused_naming_file_and_line(tmp_path, content, says):
    src = tmp_path / "my prompts.jsonl"
    src.write_text(GOOD)  # the config loads; then the file changes under it
    wf = resolve.load(config_with(tmp_path, src))
    src.unlink()
    write_source(src, content)
    out = wf.paths.dataset("prompt")
    out.parent.mkdir(parents=True)
    out.write_text("an earlier good copy\n")
    with pytest.raises(GlmsnakeError) as e:
        weights.download_dataset(wf, out, "prompt")
    msg = str(e.value)
    assert says in msg and "fix:" in msg
    assert out.read_text() == "an earlier good copy\n"  # nothing published
    assert str(src) in msg
    if content not in (None, "dir", "\udcff"):
        assert "rollout.input_key and label_key" in msg


def test_the_keys_are_the_runs_own(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text('{"question": "1+1=", "answer": "2"}\n')
    wf = resolve.load({"base_dir": str(tmp_path / "base"),
                       "overrides": {"datasets": {"prompt": {"source": f"local:{src}"}}},
                       "runs": {"r": {"rollout": {"input_key": "question", "label_key": "answer"}}}})
    weights.download_dataset(wf, wf.paths.dataset("prompt"), "prompt")
    assert wf.paths.dataset("prompt").read_text() == src.read_text()
