"""Named Mamba sizes of the Mamba paper (Gu & Dao 2023, Table 12 / the released state-spaces checkpoints).

    size   n_layer  d_model   params (tied embeddings, GPT-NeoX vocabulary 50277 padded to 50280)
    130m     24       768
    370m     48      1024
    790m     48      1536
    1.4b     48      2048
    2.8b     64      2560

Every size has d_state 16, expand 2, d_conv 4, RMSNorm, a float32 residual and tied embeddings, like the
released checkpoints. `mamba_config("1.4b", vocab_size=256)` gives one with another vocabulary (or any
other MambaConfig field overridden).
"""
from __future__ import annotations

from mamba_jax.layers.mamba import MambaConfig

MAMBA_SIZES = {
    "130m": dict(n_layer=24, d_model=768),
    "370m": dict(n_layer=48, d_model=1024),
    "790m": dict(n_layer=48, d_model=1536),
    "1.4b": dict(n_layer=48, d_model=2048),
    "2.8b": dict(n_layer=64, d_model=2560),
}
GPT_NEOX_VOCAB = 50277


def mamba_config(size: str, **overrides) -> MambaConfig:
    """The MambaConfig of a named size (MAMBA_SIZES), with `overrides` applied to any field."""
    if size not in MAMBA_SIZES:
        raise ValueError(f"mamba_config: `size` must be one of {tuple(MAMBA_SIZES)}; got {size!r}")
    values = dict(vocab_size=GPT_NEOX_VOCAB, d_state=16, expand=2, d_conv=4, pad_vocab_size_multiple=8,
                  tie_embeddings=True, residual_in_fp32=True, **MAMBA_SIZES[size])
    values.update(overrides)
    return MambaConfig(**values)
