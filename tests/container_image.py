"""Test-only: an emulated container image, made once per test session.

slime's image has its own python3 with Ray, torch and pydantic, but neither submitit nor
glmsnake, and our virtual environment is not inside it. The emulation is a venv of the host's
Python (so the compiled packages fit) whose site-packages holds links to the host venv's
packages, minus what the image lacks. The links point into `<image>/host-site`, an empty
folder on which the container stand-in (cluster/container_shims/enter_image) bind-mounts the
host's site-packages before it hides the host venv and the repository: inside, the image's
packages resolve and nothing else of ours does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What slime's image lacks: our launcher's pure-Python runtime and the package itself.
NOT_IN_IMAGE = ("glmsnake", "submitit", "cloudpickle")


def host_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _excluded(host: Path, entry: str, lacks: tuple[str, ...]) -> bool:
    """A package (or its metadata) the image lacks, or a path hook that would bring one back."""
    if entry.startswith("__editable__") or entry == "__pycache__":
        return True
    if entry.endswith(".pth"):
        text = (host / entry).read_text(errors="replace")
        return str(REPO) in text or any(name in text for name in lacks)
    return entry.split("-")[0].split(".")[0].lower() in lacks


def build_image(dest: Path, lacks: tuple[str, ...] = NOT_IN_IMAGE) -> Path:
    """An emulated image at `dest` (python3, ray and torchrun in bin/, packages but `lacks`); returns `dest`."""
    dest = Path(dest)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    site = Path(subprocess.run([str(dest / "bin" / "python3"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    host = host_site_packages()
    (dest / "host-site").mkdir()
    (dest / "no-slurm").write_text("")  # bound over Slurm's commands inside (not executable)
    for entry in sorted(os.listdir(host)):
        if _excluded(host, entry, lacks):
            continue
        (site / entry).symlink_to(dest / "host-site" / entry)
    # The image's console scripts that tasks run by name.
    for name, entry in (("ray", "ray.scripts.scripts"), ("torchrun", "torch.distributed.run")):
        script = dest / "bin" / name
        script.write_text(f"#!{dest / 'bin' / 'python3'}\nimport sys\nfrom {entry} import main\nsys.exit(main())\n")
        script.chmod(0o755)
    return dest


# The emulated images of a test session: a full one, one without Ray, one with the oldest Ray the
# launcher supports (its wheel: .ci/setup downloads it into .ci/cache).
IMAGE = "registry.example/slime:v1"
IMAGE_WITHOUT_RAY = "registry.example/slime:no-ray"
IMAGE_OLDEST_RAY = "registry.example/slime:oldest-ray"
ENTER = REPO / "tests" / "cluster" / "container_shims" / "enter_image"
WHEELS = REPO / ".ci" / "cache"


def oldest_ray_wheel() -> Path | None:
    from glmsnake.launch.ray_version import OLDEST

    found = sorted(WHEELS.glob(f"ray-{OLDEST}-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl"))
    return found[0] if found else None


def build_oldest_ray_image(dest: Path, wheel: Path) -> Path:
    """The full image, but with the oldest supported Ray (installed from its wheel) instead of ours."""
    build_image(dest, (*NOT_IN_IMAGE, "ray"))
    site = next((Path(dest) / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-compile", "--target", str(site), str(wheel)], check=True)
    return Path(dest)


def emulate_images(root: Path) -> dict[str, str]:
    """Build the session's images under `root`; the environment the container stand-ins read."""
    images = {IMAGE: build_image(Path(root) / "slime"),
              IMAGE_WITHOUT_RAY: build_image(Path(root) / "no-ray", (*NOT_IN_IMAGE, "ray"))}
    wheel = oldest_ray_wheel()
    if wheel is not None:
        images[IMAGE_OLDEST_RAY] = build_oldest_ray_image(Path(root) / "oldest-ray", wheel)
    hide = dict.fromkeys([str(REPO), sys.prefix])
    return {
        "GLMSNAKE_TEST_IMAGES": ",".join(f"{name}={path}" for name, path in images.items()),
        "GLMSNAKE_TEST_HIDE": ":".join(hide),
        "GLMSNAKE_TEST_HOST_SITE": str(host_site_packages()),
    }


__all__ = ["ENTER", "IMAGE", "IMAGE_OLDEST_RAY", "IMAGE_WITHOUT_RAY", "NOT_IN_IMAGE", "build_image", "build_oldest_ray_image", "emulate_images", "host_site_packages",
           "oldest_ray_wheel"]
