"""Every value that reaches a shell is quoted: round trips through a real /bin/sh and bash.

The awkward values: a space, both quotes, a `$` that a shell would expand, and a glob that
matches a file in the working folder (an unquoted `*` would become that file's name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from glmsnake import resolve
from glmsnake.launch.jobs import entrypoint
from glmsnake.recipe import driver, render_text

AWKWARD = ["two words", "it's", 'say "hi"', "$HOME", "*.txt", "a;b", "", "--flag=x y"]
ECHO_ARGV = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}))"


def test_ray_jobs_entrypoint_round_trips_through_sh(tmp_path):
    cwd = tmp_path / "slime $dir 'q'"
    cwd.mkdir()
    (cwd / "match.txt").write_text("")  # what an unquoted *.txt would expand to
    line = entrypoint([sys.executable, "-c", ECHO_ARGV, *AWKWARD], str(cwd))
    out = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, check=True, env={**os.environ, "HOME": "/nowhere"})
    assert json.loads(out.stdout) == {"argv": AWKWARD, "cwd": str(cwd)}


def test_entrypoint_of_slime_s_driver_is_this_exact_line():
    wf = resolve.load({"preset": "glm4.7-355b-64xh100", "base_dir": "/shared/glm"})
    d = driver(wf, "default", "10.0.0.1")
    line = entrypoint(d.argv, d.cwd)
    assert line.startswith("cd /root/slime && exec python3 train.py --actor-num-nodes 8 --actor-num-gpus-per-node 8 "
                           "--colocate --disable-bias-linear --qk-layernorm ")
    assert "--moe-layer-freq '[0]*3+[1]*89' " in line  # a glob character: quoted
    assert line.endswith(" --attention-backend flash --moe-token-dispatcher-type flex --moe-enable-deepep")


def test_rendered_recipe_runs_in_bash_with_the_driver_s_argv(tmp_path):
    """`glmsnake render` is a script a user can run: bash gives train.py exactly the driver's argv."""
    base = tmp_path / "glm data's $HOME"
    slime = tmp_path / "slime checkout"
    slime.mkdir()
    (slime / "train.py").write_text(
        "import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    wf = resolve.load({"base_dir": str(base), "overrides": {"train": {"slime_dir": str(slime)}},
                       "runs": {"default": {"train": {"slime_dir": str(slime)}}}})
    script = render_text(wf, "default")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MASTER_ADDR": "10.0.0.1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == driver(wf, "default", "10.0.0.1").argv[2:]
    assert any(str(base) in a for a in driver(wf, "default", "10.0.0.1").argv)


def test_rule_shell_lines_quote_every_value():
    """Every `{...}` a rule's shell line puts there carries Snakemake's `:q` (shell-quoted)."""
    import re

    lines = [line for p in sorted(Path(__file__).resolve().parent.parent.glob("rules/*.smk"))
             for line in p.read_text().splitlines() if line.strip().startswith('"glmsnake step')]
    assert len(lines) == 7  # one per rule: download_hf, download_dataset, two conversions, train, export, provenance
    fields = [f for line in lines for f in re.findall(r"\{([^}]*)\}", line)]
    assert fields and [f for f in fields if not f.endswith(":q")] == []
