"""M2R2: a fast residual stream over a frozen model — early exit, self-speculative decoding, expert prediction (`mamba-jax run m2r2`)."""
