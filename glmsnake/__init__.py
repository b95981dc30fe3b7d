"""glmsnake: GLM-4.7 RL with slime as a reproducible Snakemake workflow on Slurm."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout this package runs from (installed editable): presets, profiles, the Snakefile.
REPO_ROOT = Path(__file__).resolve().parent.parent
