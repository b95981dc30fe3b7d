"""Shared fixtures: the tiny checkpoint (made once), a hub endpoint on 127.0.0.1, workflow runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

_NETWORK = "host network"


def pytest_configure(config):
    """Before anything starts: the session gets a loopback-only network namespace (tests/netns.py).

    Left out for a cluster started by hand (GLMSNAKE_SLURM_REUSE: it lives in the host's
    namespace) or with GLMSNAKE_TEST_NETNS=0.
    """
    global _NETWORK
    import netns

    if os.environ.get("GLMSNAKE_SLURM_REUSE"):
        _NETWORK = "host network (GLMSNAKE_SLURM_REUSE: the cluster runs there)"
    elif os.environ.get("GLMSNAKE_TEST_NETNS", "1") == "0":
        _NETWORK = "host network (GLMSNAKE_TEST_NETNS=0)"
    else:
        why = netns.enter_loopback_only()
        _NETWORK = f"host network ({why})" if why else "own network namespace, loopback only"
        if why and in_ci():  # not root, or no unshare: CI must test as root, in its own namespace
            raise pytest.UsageError(f"CI=true, but the test session could not leave the host network: {why}")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_report_header(config):
    return f"glmsnake tests: {_NETWORK}"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """The tiny preset's HF checkpoint, generated once per test session (read-only by convention)."""
    from glmsnake import resolve
    from glmsnake.convert.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny") / "tiny-glm4moe"
    make_tiny(out, resolve.load({}).preset.model, seed=1234)
    return out


@pytest.fixture(scope="session")
def container_images(tmp_path_factory) -> dict[str, str]:
    """Emulated container images (tests/container_image.py) for the session; their environment is
    set for the whole session, so Slurm jobs submitted from here see it too."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        skip_or_fail("the container emulation needs root and unshare (a mount namespace per task)")
    from container_image import emulate_images

    env = emulate_images(tmp_path_factory.mktemp("images"))
    os.environ.update(env)
    return env


@pytest.fixture
def hub_server(monkeypatch):
    from hub_server import HubServer

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("HF_HOME", str(server_home(monkeypatch)))
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.delenv(proxy, raising=False)
        yield server


def skip_or_fail(reason: str, missing_on_this_machine: bool = True) -> None:
    """What a test does when something it needs is not here.

    A user's machine may lack it: skip, saying what to install. Under CI=true (where .ci/setup
    installs everything) or when the thing is there but broken, it is a failure: a green run
    must never hide a part that was not tested.
    """
    if missing_on_this_machine and not in_ci():
        pytest.skip(reason)
    pytest.fail(reason + (" (CI=true: CI must run this test)" if missing_on_this_machine else ""))


def server_home(monkeypatch) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="hfhome"))


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None, merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake on this repo's Snakefile with outputs under `workdir`."""
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", *args,
    ]
    # One stream: Snakemake writes its job listing to stderr and some reports to stdout.
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def run_local(workdir: Path, target: str, base_name: str = "results") -> Path:
    """`snakemake --profile profiles/local TARGET` for real, outputs in workdir/<base_name>; returns that base."""
    base = workdir / base_name
    snakemake(workdir, "--profile", str(REPO / "profiles/local"), target, "--config", f"base_dir={base}")
    return base


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
