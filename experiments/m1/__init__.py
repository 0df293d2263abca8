"""M1: distil a Transformer reasoner into a hybrid Mamba, then SFT and GRPO (`mamba-jax run m1`)."""
