"""The fused views the distillation mappings are written in, re-derived here in numpy from the stored
pieces (independently of the library's `fused_in_proj` helpers):

- attention kernels per head → matrices: q/k/v (d, heads·dh), o (heads·dh, d);
- Mamba-2: [z | x | B | C | dt] from in_proj_zx (2, d, di), in_proj_bc (2, d, g·n), in_proj_dt (d, h);
- Mamba-1 input form: [z | x | B | C | dt_low] from in_proj_zc (2, d, di) = [z, C], in_proj_xb (2, d, d_xb)
  = [x, B], in_proj_dt (d, r).
"""
import numpy as np


def attention(mixer):
    """{q_proj, k_proj, v_proj, o_proj: kernel matrix} of an attention layer's params."""
    out = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        k = np.asarray(mixer[name]["kernel"])
        out[name] = k.reshape(k.shape[0], k.shape[1] * k.shape[2])
    k = np.asarray(mixer["o_proj"]["kernel"])
    out["o_proj"] = k.reshape(k.shape[0] * k.shape[1], k.shape[2])
    return out


def mamba2_in_proj(mixer, leaf="kernel"):
    zx, bc, dt = (np.asarray(mixer[p][leaf]) for p in ("in_proj_zx", "in_proj_bc", "in_proj_dt"))
    if leaf == "bias":
        return np.concatenate([zx[0], zx[1], bc[0], bc[1], dt])
    return np.concatenate([zx[0], zx[1], bc[0], bc[1], dt], axis=1)


def mamba2_conv(mixer):
    return np.concatenate([np.asarray(mixer["conv1d_x_kernel"]), np.asarray(mixer["conv1d_bc_kernel"])], axis=1)


def mamba1_in_proj(mixer, leaf="kernel"):
    zc, xb, dt = (np.asarray(mixer[p][leaf]) for p in ("in_proj_zc", "in_proj_xb", "in_proj_dt"))
    if leaf == "bias":
        return np.concatenate([zc[0], xb[0], xb[1], zc[1], dt])
    return np.concatenate([zc[0], xb[0], xb[1], zc[1], dt], axis=1)
