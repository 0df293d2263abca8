"""The in-context-learning experiment (Garg et al. 2022; Grazzi et al. 2024): regression prompts and baselines."""
