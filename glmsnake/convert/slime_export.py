"""The slime backend of the export: slime's own `tools/convert_torch_dist_to_hf.py`, one task on one node.

slime's tool reads one iteration folder of a torch_dist checkpoint (whatever key layout slime's
Megatron wrote), writes HF safetensors shards and an index, and copies the non-weight files
(config, tokenizer) from the original HF folder. It runs in slime's checkout with Megatron-LM
first on PYTHONPATH, in the cluster's container like the other slime steps. Plain data: the task
pickles into any node or container.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from glmsnake.errors import GlmsnakeError

SCRIPT = "tools/convert_torch_dist_to_hf.py"


@dataclass(frozen=True)
class SlimeExporter:
    needs: ClassVar[tuple[str, ...]] = ("torch",)  # from the image: slime's tool runs on it
    iteration_dir: str  # runs/<run>/checkpoints/iter_XXXXXXX (the tool reads common.pt there)
    output_dir: str  # a staging folder; published by the step when complete
    origin_hf_dir: str  # the run's HF weights: config, tokenizer, and the model class
    vocab_size: int  # strips Megatron's vocabulary padding
    slime_dir: str
    megatron_dir: str

    def command(self, base_env: Mapping[str, str] | None = None) -> tuple[list[str], str, dict[str, str]]:
        """(argv, cwd, env) of slime's tool."""
        argv = ["python3", SCRIPT, "--input-dir", self.iteration_dir, "--output-dir", self.output_dir,
                "--origin-hf-dir", self.origin_hf_dir, "--vocab-size", str(self.vocab_size)]
        env = dict(os.environ if base_env is None else base_env)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = self.megatron_dir + (os.pathsep + old if old else "")
        return argv, self.slime_dir, env

    def __call__(self) -> dict[str, Any]:
        argv, cwd, env = self.command()
        print("[glmsnake] " + " ".join(argv), file=sys.stderr, flush=True)
        rc = subprocess.run(argv, cwd=cwd, env=env).returncode
        if rc != 0:
            raise GlmsnakeError(f"slime's {Path(SCRIPT).name} exited with {rc}",
                                "read the task log; or set export.backend: glmsnake to use glmsnake's reader")
        return {"rc": rc}
