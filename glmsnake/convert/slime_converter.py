"""The slime backend of the torch_dist conversion: slime's own converter under torchrun, one task per node.

slime's `tools/convert_hf_to_torch_dist.py` builds the Megatron model and saves it with Megatron's
own writer. Each task of the allocation runs torchrun with this node's rank and the master
address the launcher found; cwd is slime's checkout and PYTHONPATH puts Megatron-LM first.
Everything here is plain data, so the task pickles into any node or container.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from glmsnake.errors import GlmsnakeError

SCRIPT = "tools/convert_hf_to_torch_dist.py"


@dataclass(frozen=True)
class SlimeConverter:
    needs: ClassVar[tuple[str, ...]] = ("torch",)  # from the image: torchrun runs slime's tool
    model_args: tuple[str, ...]  # MODEL_ARGS, rendered
    hf_dir: str
    save_dir: str
    nnodes: int
    nproc_per_node: int
    slime_dir: str
    megatron_dir: str

    def command(self, *, node_rank: int, master_addr: str, master_port: int | str,
                base_env: Mapping[str, str] | None = None) -> tuple[list[str], str, dict[str, str]]:
        """(argv, cwd, env) of the converter on the node of rank `node_rank`."""
        argv = [
            "torchrun",
            "--nnodes", str(self.nnodes),
            "--nproc-per-node", str(self.nproc_per_node),
            "--node-rank", str(node_rank),
            "--master-addr", str(master_addr),
            "--master-port", str(master_port),
            SCRIPT,
            *self.model_args,
            "--hf-checkpoint", self.hf_dir,
            "--save", self.save_dir,
        ]
        env = dict(os.environ if base_env is None else base_env)
        old = env.get("PYTHONPATH")
        env.update({
            "PYTHONPATH": self.megatron_dir + (os.pathsep + old if old else ""),
            "MASTER_ADDR": str(master_addr),
            "MASTER_PORT": str(master_port),
            "NODE_RANK": str(node_rank),
        })
        # torchrun sets these per worker; stale values from the launcher would confuse it.
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        return argv, self.slime_dir, env

    def __call__(self) -> dict[str, Any]:
        """One task of the allocation: this node's torchrun."""
        node_rank = int(os.environ.get("NODE_RANK", os.environ.get("RANK", 0)))
        argv, cwd, env = self.command(node_rank=node_rank,
                                      master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                      master_port=os.environ.get("MASTER_PORT", "29500"))
        print("[glmsnake] " + " ".join(argv), file=sys.stderr, flush=True)
        rc = subprocess.run(argv, cwd=cwd, env=env).returncode
        if rc != 0:
            raise GlmsnakeError(f"slime's {Path(SCRIPT).name} exited with {rc} on node rank {node_rank}",
                                "read the task log; set convert.torch_dist.backend: glmsnake to use the CPU writer")
        return {"node_rank": node_rank, "rc": rc}
