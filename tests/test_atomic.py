"""Crash safety of every output: a failed or killed writer leaves the old content (or nothing), never
a half-written file or folder at the final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from glmsnake import atomic, publish

REPO = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, bytes]:
    """A folder's files and contents (less the list of glmsnake's own files)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != publish.FILES_NAME}


def _staged(parent: Path, name: str, content: bytes) -> Path:
    stage = publish.temp_dir_for(parent / name)
    stage.mkdir()
    (stage / "weights.bin").write_bytes(content)
    (stage / "index.json").write_text('{"new": true}')
    return stage


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic.write_bytes(path, b"old")

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish.os, "replace", fail)
    with pytest.raises(OSError):
        atomic.write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def _killed_child(code: str) -> None:
    """Run `code` in a child that SIGKILLs itself at the patched point."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_writer_killed_before_the_rename_leaves_the_old_file(tmp_path):
    """Every byte is written, then the process dies before the rename: the new bytes never show."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    _killed_child(
        "import os, signal; from glmsnake import atomic\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic.write_bytes({str(path)!r}, b'new' * 100000)\n"
    )
    assert path.read_bytes() == b"old"


def test_a_failed_publish_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Where the file system cannot exchange: the old folder is moved aside, the rename of the new
    one fails, and the old one is back at its name."""
    final = tmp_path / "hf"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"old weights")
    stage = _staged(tmp_path, "hf", b"new weights")
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def replace_then_fail(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the staging folder onto the final name
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(publish.os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        publish.publish_dir(stage, final)
    assert _tree(final) == {"weights.bin": b"old weights"}
    assert _tree(stage)["weights.bin"] == b"new weights"  # the new folder is still there for a retry


def test_the_exchange_is_used_here(tmp_path):
    """This machine's file system swaps in one step (the path the kill test below relies on)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    assert publish._exchange(a, b) and (b / "x").read_text() == "a" and not (a / "x").exists()


@pytest.mark.parametrize("kill_at", ["exchange", "move-aside"])
def test_a_publisher_killed_midway_leaves_a_whole_folder(tmp_path, kill_at):
    """Killed at the swap: the final name holds the old folder or the new one, whole; never a mix."""
    final = tmp_path / "fp8"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"old weights")
    stage = _staged(tmp_path, "fp8", b"new weights")
    if kill_at == "exchange":  # the exchange happens, then the process dies before cleaning up
        hook = ("real = publish._exchange\n"
                "def ex(a, b):\n    assert real(a, b)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                "publish._exchange = ex\n")
    else:  # no exchange: die after the old folder was moved aside
        hook = ("publish._exchange = lambda a, b: False\nreal = os.replace\n"
                f"def rep(a, b):\n    real(a, b)\n    if str(a) == {str(final)!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
                "publish.os.replace = rep\n")
    _killed_child("import os, signal; from pathlib import Path; from glmsnake import publish\n" + hook +
                  f"publish.publish_dir(Path({str(stage)!r}), Path({str(final)!r}))\n")
    if kill_at == "exchange":
        assert _tree(final) == {"index.json": b'{"new": true}', "weights.bin": b"new weights"}
    else:  # the documented window of the fallback: nothing at the final name, the old folder kept aside
        assert not final.exists()
        kept = [p for p in tmp_path.iterdir() if p.name.startswith(".fp8.old")]
        assert len(kept) == 1 and _tree(kept[0]) == {"weights.bin": b"old weights"}


def test_publish_replaces_the_old_folder_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "torch_dist"
    stale = publish.temp_dir_for(final)
    stale.mkdir()
    (stale / "stale.bin").write_bytes(b"old")  # glmsnake's own file of the last publish
    publish.publish_dir(stale, final)
    publish.publish_dir(_staged(tmp_path, "torch_dist", b"new"), final)
    assert _tree(final) == {"index.json": b'{"new": true}', "weights.bin": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch_dist"]


def test_files_glmsnake_did_not_write_survive_a_republish(tmp_path, capsys):
    final = tmp_path / "hf"
    publish.publish_dir(_staged(tmp_path, "hf", b"v1"), final)
    (final / "MY_NOTES.md").write_text("my notes")
    (final / "eval").mkdir()
    (final / "eval" / "results.json").write_text("{}")
    (final / "index.json").write_text("edited by hand")  # glmsnake's file: replaced
    publish.publish_dir(_staged(tmp_path, "hf", b"v2"), final)
    assert _tree(final) == {"MY_NOTES.md": b"my notes", "eval/results.json": b"{}",
                            "index.json": b'{"new": true}', "weights.bin": b"v2"}
    assert "kept 2 file(s) glmsnake did not write: MY_NOTES.md, eval/results.json" in capsys.readouterr().err
    # A user's file under the name of a new output is kept beside it.
    (final / "notes.txt").write_text("mine")
    stage = _staged(tmp_path, "hf", b"v3")
    (stage / "notes.txt").write_text("glmsnake's")
    publish.publish_dir(stage, final)
    assert _tree(final)["notes.txt"] == b"glmsnake's" and _tree(final)["notes.txt.kept"] == b"mine"


def test_a_folder_from_before_the_file_list_is_moved_aside_whole(tmp_path, capsys):
    final = tmp_path / "fp8"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"old")
    (final / "MY_NOTES.md").write_text("notes")
    publish.publish_dir(_staged(tmp_path, "fp8", b"new"), final)
    assert _tree(final) == {"index.json": b'{"new": true}', "weights.bin": b"new"}
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("fp8.replaced-")]
    assert _tree(aside) == {"MY_NOTES.md": b"notes", "weights.bin": b"old"}
    assert f"moved whole to {aside}" in capsys.readouterr().err


def test_secret_files_are_private_from_the_first_byte(tmp_path):
    path = tmp_path / "token.json"
    atomic.write_json(path, {"token": "x"}, mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600
