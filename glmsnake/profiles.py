"""Make `snakemake --profile slurm|local` find this repo's profiles.

Snakemake looks for a named profile in the user's and the site's config folders
(~/.config/snakemake, /etc/xdg/snakemake); linking ours there makes the README's
exact command work from any folder, while `--profile profiles/slurm` works too.
"""

from __future__ import annotations

import os
from pathlib import Path

from glmsnake import REPO_ROOT
from glmsnake.errors import GlmsnakeError

PROFILES = ("slurm", "local")


def user_profile_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake"


def install_profiles(dest: Path | None = None) -> list[Path]:
    dest = dest or user_profile_dir()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GlmsnakeError(f"cannot make the profile folder {dest}: {e.strerror}",
                            "pass --dest a folder you can write (default: ~/.config/snakemake)") from None
    links = []
    for name in PROFILES:
        target = REPO_ROOT / "profiles" / name
        link = dest / name
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise GlmsnakeError(f"{link} exists and is not a link to glmsnake's profile", "move it away, then rerun")
        link.symlink_to(target, target_is_directory=True)
        links.append(link)
    return links
