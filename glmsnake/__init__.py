"""glmsnake: GLM-4.7 RL with slime as a reproducible Snakemake workflow on Slurm."""

__version__ = "0.1.0"
