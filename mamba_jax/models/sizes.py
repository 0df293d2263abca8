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


SCAN_FLOPS_PER_STATE = 6   # h ← exp(Δ·A)·h + (Δ·x)·B and y += C·h: three multiply-adds per (token, channel, state)


def mixer_flops_per_token(config: MambaConfig) -> int:
    """Analytic FLOPs (2 per multiply-add) of one Mamba-1 mixer per token, the default (conv-output) form:
    in_proj d → 2·d_inner, the depthwise conv (d_conv taps per channel), x_proj d_inner → dt_rank + 2·d_state,
    dt_proj dt_rank → d_inner, the selective scan (`SCAN_FLOPS_PER_STATE` per channel and state) and out_proj
    d_inner → d. Element-wise work (norms, SiLU, softplus, exponentials, the D skip, the gate) is not
    counted: it is O(d_inner) per token against the O(d · d_inner) matmuls."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank_value, config.d_conv
    if config.bc_source != "conv" or not config.selective:
        raise ValueError("mixer_flops_per_token: counts the default selective mixer (bc_source='conv', "
                         "selective=True) only")
    multiply_adds = d * 2 * di + k * di + di * (r + 2 * n) + r * di + di * d
    return 2 * multiply_adds + SCAN_FLOPS_PER_STATE * di * n
