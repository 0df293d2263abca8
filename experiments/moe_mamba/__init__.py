"""The MoE-Mamba experiment (Pióro et al., arXiv 2401.04081): plain Mamba vs MoE-Mamba with the same active
parameters per token on byte-level text, the steps-to-loss speedup, and expert/routing/capacity ablations."""
