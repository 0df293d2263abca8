"""Attention → Mamba initialisation (MambaInLlama, arXiv 2408.15237; M1, arXiv 2504.10449): the Mamba-2
form (`attention_to_mamba2`, below) and the Mamba-1 form (`attention_to_mamba1`, at the end).

A trained `TransformerLM` becomes a `HybridLM` student: chosen attention layers are replaced by Mamba-2
mixers whose input projection [z, x, B, C, dt] starts from the attention weights, the rest is copied.

Why this works: with A = 0 and Δ = 1 a Mamba-2 head computes y_t = Σ_{s≤t} (C_t · B_s) x_s, causal
*linear* attention with query C, key B and value x. So, per attention head (d_state = head_dim):

    x ← W_V,  B ← W_K,  C ← W_Q,  out_proj ← W_O      (grouped-query K/V repeated to the query heads)

The rest of the mixer is set so that, at initialisation, it computes (normalised) linear attention and
nothing else (the defaults; each has a "fresh" alternative that keeps the student's own random init, as
MambaInLlama does):

    conv_init="identity":        the causal conv passes x, B, C through (last tap 1, others and bias 0)
    ssm_init="linear_attention": Δ = 1 for every token (dt columns of in_proj 0, dt_bias = softplus⁻¹(1)),
                                 A = -LINEAR_ATTENTION_DECAY (A_log = log 0.01: a slight decay that keeps
                                 A_log trainable, dA/dA_log = A) and D = 0 (no skip x)
    gate_init="open":            the gate silu(z) is the same positive constant on every channel (z
                                 columns of in_proj 0, z bias OPEN_GATE_BIAS), which the per-head RMSNorm
                                 divides out; needs in_proj/out_proj biases, so the student's Mamba-2
                                 mixers get `bias=True` (all biases 0 except z's)

so each student head is out_proj(w ⊙ rmsnorm(Σ_{s≤t} (silu(C_t) · silu(B_s)) silu(x_s))): the teacher's
head with softmax(q·k) replaced by the feature map silu and a per-head RMSNorm in place of the softmax
denominator. The student has one Mamba-2 head per attention head: head_dim = d_state = head_dim, n_groups =
n_heads (B and C per head), d_inner = n_heads · head_dim. Embeddings, norms, MLPs, the final norm and the
head are copied from the teacher, as are the attention layers that stay.

Why these defaults (measured in tests/distill/test_attention_init_measured.py, eight toy MQAR
Transformers): with MambaInLlama's fresh conv / Δ / A / D / gate the copied out_proj reads a distorted
signal, and the student started *worse* than one with a random mixer on 7 of 8 teachers (in a probe the
random gate alone more than doubled the initial KL); with all of them set to linear attention it starts
below the random mixer on every teacher (1.1–5.5× lower held-out KL) and converges much faster (2.5–5.0×
lower mean KL over 30 stage-1 steps). The mapping drops rotary embeddings (the scan has no place for
them, as in MambaInLlama): in a probe with a RoPE teacher the head start was much smaller, so the
measured check uses a teacher with learned absolute positions.

Shapes (flax, kernels stored (in, out)): teacher q_proj (d_model, h, dh), k_proj/v_proj (d_model, kv, dh),
o_proj (h, dh, d_model), read flattened to (d_model, h·dh) etc. (`flat_attention_kernels`); student in_proj
read as the fused (d_model, 2·d_inner + 2·h·dh + h) matrix, out_proj (d_inner, d_model).

The Mamba-1 form (MambaInLlama's `mamba/hybrid_mamba_layer.py`; `MambaConfig(bc_source="input")`): the
mixer computes z, x (d_xb = kv·dh channels), B (d_xb), C (d_inner = h·dh) and Δ from the layer input, with
expand = h·dh / d_model (1 for Llama) and d_state = 16; x and B are repeated to d_inner chunk by chunk
(chunks of d_state), so the scan sees d_inner / d_state B/C groups of d_state, and channel c reads group
c // d_state. x ← W_V, B ← W_K, C ← W_Q, out_proj ← W_O as in MambaInLlama. With A = 0 and Δ = 1 each
group is a causal linear-attention "head" of width d_state: y_c,t = Σ_{s≤t} (C_g,t · B_g,s) x_c,s, i.e. the
teacher head's q·k split into head_dim / d_state partial dot products, each weighting its own d_state
slice of v (d_state = head_dim gives the Mamba-2 form's per-head linear attention). One deviation from
MambaInLlama, shown in tests/distill/test_attention_init_mamba1.py: its repeat of K/V chunks pairs query
chunk g with key chunk g // rep, which under grouped-query attention with head_dim > d_state (Llama-3:
32 heads, 8 kv heads, head_dim 128, d_state 16) is the wrong kv head or chunk for most g; we place the
W_Q chunks (and W_O rows) in `mamba1_group_order` so that every group pairs q, k, v of the same teacher
head and chunk (for multi-head attention, or d_state = head_dim, the order is the identity, i.e.
MambaInLlama's copy). The init options are the Mamba-2 form's, except that the open gate is silu(z) = 1:
Mamba-1 has no norm after the gate, so the linear attention is not normalised. B and C skip the conv in
this form, so with the defaults each group computes Σ_{s≤t} e^{-0.01 (t-s)} (q_t · k_s) silu(v_s): raw q·k
as in the teacher's softmax logits, silu only on the values (the conv's activation).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.config import MAMBA, MAMBA2
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba import fused_in_proj as fused_mamba1_in_proj
from mamba_jax.layers.mamba import split_in_proj as split_mamba1_in_proj
from mamba_jax.layers.mamba2 import Mamba2Config, fused_conv, fused_in_proj, split_conv, split_in_proj
from mamba_jax.models.hybrid import HybridConfig, HybridLM
from mamba_jax.models.lm import init_params

CONV_INITS = ("fresh", "identity")
SSM_INITS = ("fresh", "linear_attention")
GATE_INITS = ("fresh", "open")
LINEAR_ATTENTION_DECAY = 1e-2   # A = -0.01 under ssm_init="linear_attention"
OPEN_GATE_BIAS = 4.0            # z bias under gate_init="open"; silu(4) ≈ 3.93, divided out by the norm


def replaced_layers(n_layer: int, layers: Optional[Sequence[int]] = None,
                    fraction: Optional[float] = None) -> Tuple[int, ...]:
    """The indices of the attention layers to replace: `layers` as given, or a `fraction` of the
    n_layer layers spread evenly from layer 0 (0.5 of 8 → 0, 2, 4, 6; 0.25 → 0, 4; 0.125 → 0).

    Exactly one of `layers` and `fraction` must be given.
    """
    if (layers is None) == (fraction is None):
        raise ValueError("replaced_layers: give exactly one of `layers` (indices) and `fraction` (e.g. 0.5)")
    if layers is not None:
        out = tuple(sorted({int(i) for i in layers}))
        if not out or out[0] < 0 or out[-1] >= n_layer or any(int(i) != i for i in layers):
            raise ValueError(f"replaced_layers: `layers` must be distinct ints in [0, {n_layer}); got {list(layers)}")
        return out
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"replaced_layers: `fraction` must be in (0, 1]; got {fraction!r}")
    count = max(1, round(fraction * n_layer))
    return tuple(sorted({math.floor(i * n_layer / count) for i in range(count)}))


def mamba2_student_config(teacher: TransformerConfig, layers: Sequence[int], *,
                          chunk_size: int = 256, bias: bool = False) -> HybridConfig:
    """The HybridConfig of the student: "M2" at `layers`, "A" elsewhere, one Mamba-2 head per attention
    head (head_dim = d_state = head_dim, n_groups = n_heads), MLPs as the teacher's. `bias`: the Mamba-2
    in_proj/out_proj biases (needed by gate_init="open")."""
    if not isinstance(teacher, TransformerConfig):
        raise ValueError(f"mamba2_student_config: `teacher` must be a TransformerConfig; got {type(teacher).__name__}")
    h, dh = teacher.n_heads, teacher.head_dim_value
    d_inner = h * dh
    if d_inner % teacher.d_model:
        raise ValueError(f"mamba2_student_config: n_heads · head_dim = {d_inner} must be a multiple of d_model = "
                         f"{teacher.d_model} (Mamba-2's d_inner = expand · d_model)")
    layers = replaced_layers(teacher.n_layer, layers)
    pattern = " ".join("M2" if i in layers else "A" for i in range(teacher.n_layer))
    mamba2 = Mamba2Config(expand=d_inner // teacher.d_model, head_dim=dh, d_state=dh, n_groups=h, bias=bool(bias),
                          chunk_size=chunk_size, d_intermediate=teacher.mlp_width, mlp_bias=teacher.mlp_bias,
                          vocab_size=teacher.vocab_size, d_model=teacher.d_model)
    common = {name: getattr(teacher, name) for name in (
        "vocab_size", "d_model", "rms_norm_eps", "residual_in_fp32", "tie_embeddings", "pad_vocab_size_multiple",
        "initializer_range", "dtype", "param_dtype", "d_intermediate", "mlp_bias")}
    return HybridConfig(pattern=pattern, mamba2=mamba2, attention=teacher, **common)


def _repeat_heads(kernel, kv_heads: int, heads: int, head_dim: int):
    """(d_model, kv·dh) → (d_model, h·dh): query head i reads kv head i // (h / kv), as the attention does."""
    d_model = kernel.shape[0]
    return jnp.repeat(kernel.reshape(d_model, kv_heads, head_dim), heads // kv_heads, axis=1).reshape(
        d_model, heads * head_dim)


def _check_init_options(where: str, conv_init: str, ssm_init: str, gate_init: str) -> None:
    for name, value, allowed in (("conv_init", conv_init, CONV_INITS), ("ssm_init", ssm_init, SSM_INITS),
                                 ("gate_init", gate_init, GATE_INITS)):
        if value not in allowed:
            raise ValueError(f"{where}: `{name}` must be one of {allowed}; got {value!r}")


def flat_attention_kernels(attention: Dict[str, Any]) -> Dict[str, Any]:
    """An attention layer's params with the per-head kernels flattened to matrices: q/k/v_proj (d, heads·dh),
    o_proj (h·dh, d) — the column / row order the mappings below are written in (head-major)."""
    out = dict(attention)
    for name in ("q_proj", "k_proj", "v_proj"):
        kernel = attention[name]["kernel"]
        out[name] = {**attention[name], "kernel": kernel.reshape(kernel.shape[0], -1)}
    kernel = attention["o_proj"]["kernel"]
    out["o_proj"] = {**attention["o_proj"], "kernel": kernel.reshape(-1, kernel.shape[-1])}
    return out


def mamba2_mixer_from_attention(attention: Dict[str, Any], fresh: Dict[str, Any], teacher: TransformerConfig, *,
                                conv_init: str = "identity", ssm_init: str = "linear_attention",
                                gate_init: str = "open") -> Dict[str, Any]:
    """The params of one student Mamba-2 mixer: `fresh` (its own initialisation) with in_proj's x, B, C
    columns and out_proj taken from the `attention` params (q_proj, k_proj, v_proj, o_proj), and the conv,
    Δ, A, D and gate set as the options say (module docstring; "fresh" keeps `fresh`'s values).

    The student's in_proj is read and written as the official fused (d_model, 2·d_inner + 2·h·dh + h) matrix of
    columns [z | x | B | C | dt] and its conv as (k, conv_dim) (`layers.mamba2.fused_in_proj`, `fused_conv`);
    dt_bias, A_log, D (h,). gate_init="open" needs `fresh` to have in_proj/out_proj biases (`bias=True`).
    """
    _check_init_options("mamba2_mixer_from_attention", conv_init, ssm_init, gate_init)
    h, kv, dh = teacher.n_heads, teacher.kv_heads, teacher.head_dim_value
    d_inner, gn = h * dh, h * dh
    if "in_proj_zx" not in fresh or fresh["in_proj_zx"]["kernel"].shape != (2, teacher.d_model, d_inner):
        got = fresh["in_proj_zx"]["kernel"].shape if "in_proj_zx" in fresh else sorted(fresh)
        raise ValueError(f"mamba2_mixer_from_attention: the student's in_proj_zx kernel is {got}, expected "
                         f"{(2, teacher.d_model, d_inner)} for one Mamba-2 head per attention head")
    has_bias = "bias" in fresh["in_proj_zx"]
    if gate_init == "open" and (not has_bias or "bias" not in fresh["out_proj"]):
        raise ValueError("mamba2_mixer_from_attention: gate_init='open' needs a student with Mamba-2 biases "
                         "(mamba2_student_config(..., bias=True))")
    mixer_cfg = mamba2_student_config(teacher, [0], bias=has_bias).mixer_config(MAMBA2)
    in_proj, in_bias = fused_in_proj(fresh, mixer_cfg)     # columns [z (d_inner) | x | B (h·dh) | C (h·dh) | dt (h)]
    conv, conv_bias = fused_conv(fresh, mixer_cfg)         # (k, conv_dim) over [x | B | C]
    dtype = in_proj.dtype
    attention = flat_attention_kernels(attention)
    x = _repeat_heads(attention["v_proj"]["kernel"], kv, h, dh)
    B = _repeat_heads(attention["k_proj"]["kernel"], kv, h, dh)
    C = attention["q_proj"]["kernel"]
    in_proj = in_proj.at[:, d_inner:2 * d_inner].set(x.astype(dtype))
    in_proj = in_proj.at[:, 2 * d_inner:2 * d_inner + gn].set(B.astype(dtype))
    in_proj = in_proj.at[:, 2 * d_inner + gn:2 * d_inner + 2 * gn].set(C.astype(dtype))
    out = dict(fresh)
    out["out_proj"] = {**fresh["out_proj"], "kernel": attention["o_proj"]["kernel"].astype(dtype)}
    if conv_init == "identity":
        conv = jnp.zeros_like(conv).at[-1].set(1)
        conv_bias = None if conv_bias is None else jnp.zeros_like(conv_bias)
    if ssm_init == "linear_attention":
        in_proj = in_proj.at[:, -h:].set(0)                                                # Δ ignores the input
        out["dt_bias"] = jnp.full_like(fresh["dt_bias"], math.log(math.expm1(1.0)))      # softplus(dt_bias) = 1
        out["A_log"] = jnp.full_like(fresh["A_log"], math.log(LINEAR_ATTENTION_DECAY))
        out["D"] = jnp.zeros_like(fresh["D"])
    if gate_init == "open":
        in_proj = in_proj.at[:, :d_inner].set(0)
        in_bias = jnp.zeros_like(in_bias).at[:d_inner].set(OPEN_GATE_BIAS)
        out["out_proj"]["bias"] = jnp.zeros_like(fresh["out_proj"]["bias"])
    out.update(split_in_proj(in_proj, in_bias, mixer_cfg))
    out.update(split_conv(conv, conv_bias, mixer_cfg))
    return out


def attention_to_mamba2(teacher: TransformerConfig, teacher_params, rng, *, layers: Optional[Sequence[int]] = None,
                        fraction: Optional[float] = None, conv_init: str = "identity",
                        ssm_init: str = "linear_attention", gate_init: str = "open",
                        chunk_size: int = 256) -> Tuple[HybridConfig, Dict[str, Any]]:
    """A hybrid student from a trained TransformerLM: (HybridConfig, params).

    Args:
      teacher: the teacher's TransformerConfig; teacher_params: its params (the `params` collection).
      rng: a PRNGKey for the student's parts the options leave fresh (z, Δ, A, D, conv; the gated norm's weight).
      layers / fraction: which attention layers become Mamba-2 (see `replaced_layers`).
      conv_init / ssm_init / gate_init: the linear-attention setting of the conv, of Δ, A, D and of the
        gate (the defaults), or "fresh" for the student's own random values (MambaInLlama keeps them all
        fresh: conv_init=ssm_init=gate_init="fresh"); see the module docstring. gate_init="open" gives the
        student's Mamba-2 mixers in_proj/out_proj biases.

    Every other parameter (embeddings, norms, MLPs, the kept attention layers, the final norm, the head)
    is the teacher's, unchanged. Bias terms of q/k/v/o projections (attention_bias=True) have no place in
    the Mamba-2 mixer and are dropped.
    """
    _check_init_options("attention_to_mamba2", conv_init, ssm_init, gate_init)
    replaced = replaced_layers(teacher.n_layer, layers, fraction)
    config = mamba2_student_config(teacher, replaced, chunk_size=chunk_size, bias=gate_init == "open")
    mixer = lambda attention, fresh: mamba2_mixer_from_attention(attention, fresh, teacher, conv_init=conv_init,
                                                                 ssm_init=ssm_init, gate_init=gate_init)
    return config, _assemble_student("attention_to_mamba2", config, teacher_params, rng, replaced, mixer)


def _assemble_student(where: str, config: HybridConfig, teacher_params, rng, replaced: Sequence[int],
                      mixer_from_attention) -> Dict[str, Any]:
    """The student's params: the teacher's everywhere, except the mixers of the `replaced` layers, which
    are `mixer_from_attention(teacher attention params, the student's fresh mixer params)`."""
    student = init_params(HybridLM(config), rng)
    missing = [name for name in student if name not in teacher_params and not name.startswith("layers_")]
    if missing or set(teacher_params) - set(student):
        raise ValueError(f"{where}: `teacher_params` do not match the teacher config (student "
                         f"parts {sorted(student)}, teacher parts {sorted(teacher_params)})")
    params = {}
    for name, value in student.items():
        if not name.startswith("layers_"):
            params[name] = teacher_params[name]
            continue
        layer = dict(teacher_params[name])
        if int(name.split("_")[1]) in replaced:
            layer["mixer"] = mixer_from_attention(teacher_params[name]["mixer"], value["mixer"])
        params[name] = layer
    # own buffers: a train step that donates the student's state must not delete the teacher's arrays
    params = jax.tree_util.tree_map(jnp.copy, params)
    shapes_ok = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: np.shape(a) == np.shape(b), params, student))
    if not shapes_ok:
        raise ValueError(f"{where}: a copied parameter's shape differs from the student's")
    return params


# --- the Mamba-1 form (MambaInLlama's `mamba/hybrid_mamba_layer.py`) -----------------------------------

def _silu_inverse(value: float) -> float:
    """The z > 0 with silu(z) = z·sigmoid(z) = value (Newton's method; silu is increasing for z > 0)."""
    z = max(value, 1.0)
    for _ in range(50):
        sig = 1.0 / (1.0 + math.exp(-z))
        z -= (z * sig - value) / (sig * (1.0 + z * (1.0 - sig)))
    return z


MAMBA1_OPEN_GATE_BIAS = _silu_inverse(1.0)   # ≈ 1.2785: silu = 1, the Mamba-1 gate passes y unchanged


def mamba1_student_config(teacher: TransformerConfig, layers: Sequence[int], *, d_state: int = 16,
                          bias: bool = False) -> HybridConfig:
    """The HybridConfig of a Mamba-1-form student: "M" at `layers`, "A" elsewhere, each "M" a
    `MambaConfig(bc_source="input")` with d_inner = n_heads · head_dim (expand = d_inner / d_model: 1 for
    Llama shapes), d_xb = kv_heads · head_dim, `d_state` (MambaInLlama: 16) and so d_inner / d_state B/C
    groups; MLPs as the teacher's. `bias`: in_proj/out_proj biases (needed by gate_init="open")."""
    if not isinstance(teacher, TransformerConfig):
        raise ValueError(f"mamba1_student_config: `teacher` must be a TransformerConfig; got {type(teacher).__name__}")
    h, kv, dh = teacher.n_heads, teacher.kv_heads, teacher.head_dim_value
    d_inner = h * dh
    if d_inner % teacher.d_model:
        raise ValueError(f"mamba1_student_config: n_heads · head_dim = {d_inner} must be a multiple of d_model = "
                         f"{teacher.d_model} (Mamba-1's d_inner = expand · d_model)")
    if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 1 or dh % d_state:
        raise ValueError(f"mamba1_student_config: `d_state` must be a positive int dividing head_dim = {dh} (a B/C "
                         f"group must not straddle two attention heads); got {d_state!r}")
    layers = replaced_layers(teacher.n_layer, layers)
    pattern = " ".join("M" if i in layers else "A" for i in range(teacher.n_layer))
    mamba = MambaConfig(expand=d_inner // teacher.d_model, d_state=d_state, bc_source="input", d_xb=kv * dh,
                        bias=bool(bias), d_intermediate=teacher.mlp_width, mlp_bias=teacher.mlp_bias,
                        vocab_size=teacher.vocab_size, d_model=teacher.d_model)
    common = {name: getattr(teacher, name) for name in (
        "vocab_size", "d_model", "rms_norm_eps", "residual_in_fp32", "tie_embeddings", "pad_vocab_size_multiple",
        "initializer_range", "dtype", "param_dtype", "d_intermediate", "mlp_bias")}
    return HybridConfig(pattern=pattern, mamba=mamba, attention=teacher, **common)


def mamba1_group_order(heads: int, kv_heads: int, head_dim: int, d_state: int) -> np.ndarray:
    """(heads · head_dim / d_state,) ints: the query chunk (of d_state columns of W_Q, counted over all
    heads) that student B/C group g reads.

    The mixer repeats x and B chunk by chunk (group g reads K/V chunk g // rep, rep = heads / kv_heads).
    With s = head_dim / d_state chunks per head, group g = (j·s + r)·rep + m gets K/V head j's chunk r, so
    it must get the query head i = j·rep + m (one that reads kv head j) at the same chunk r: W_Q chunk
    i·s + r. This is the identity for multi-head attention (rep = 1) or d_state = head_dim (s = 1).
    """
    s, rep = head_dim // d_state, heads // kv_heads
    g = np.arange(heads * s)
    kv_chunk, m = g // rep, g % rep
    j, r = kv_chunk // s, kv_chunk % s
    return (j * rep + m) * s + r


def mamba1_mixer_from_attention(attention: Dict[str, Any], fresh: Dict[str, Any], teacher: TransformerConfig, *,
                                d_state: int = 16, conv_init: str = "identity", ssm_init: str = "linear_attention",
                                gate_init: str = "open") -> Dict[str, Any]:
    """The params of one student Mamba-1 (`bc_source="input"`) mixer: `fresh` with x ← W_V, B ← W_K,
    C ← W_Q and out_proj ← W_O (query chunks and the matching W_O rows in `mamba1_group_order`), and the
    conv, Δ, A, D and gate set as the options say ("fresh" keeps `fresh`'s values):

      conv_init="identity":        conv1d last tap 1, other taps and bias 0
      ssm_init="linear_attention": Δ = 1 (dt_low columns of in_proj 0, dt_proj_bias = softplus⁻¹(1)),
                                   A = -LINEAR_ATTENTION_DECAY on every (channel, state), D = 0
      gate_init="open":            z columns 0 and z bias MAMBA1_OPEN_GATE_BIAS, so silu(z) = 1 (Mamba-1
                                   has no norm after the gate to divide a constant out); needs biases

    The input projections are read and written as MambaInLlama's fused (d_model, 2·d_inner + 2·d_xb + dt_rank)
    matrix [z | x | B | C | dt_low] (`layers.mamba.fused_in_proj`), d_inner = h·dh, d_xb = kv·dh; out_proj
    kernel (d_inner, d_model); conv1d_kernel (k, d_inner); A_log (d_inner, d_state).
    """
    _check_init_options("mamba1_mixer_from_attention", conv_init, ssm_init, gate_init)
    h, kv, dh, d = teacher.n_heads, teacher.kv_heads, teacher.head_dim_value, teacher.d_model
    di, dxb, n = h * dh, kv * dh, d_state
    if "in_proj_dt" not in fresh or fresh["A_log"].shape != (di, n) or \
            fresh["in_proj_zc"]["kernel"].shape != (2, d, di) or fresh["in_proj_xb"]["kernel"].shape != (2, d, dxb):
        raise ValueError(f"mamba1_mixer_from_attention: the student's input projections / A_log {fresh['A_log'].shape} "
                         f"do not fit d_inner = {di}, d_xb = {dxb}, d_state = {n} (build the student with "
                         "mamba1_student_config)")
    has_bias = "bias" in fresh["in_proj_zc"]
    if gate_init == "open" and (not has_bias or "bias" not in fresh["out_proj"]):
        raise ValueError("mamba1_mixer_from_attention: gate_init='open' needs a student with Mamba-1 biases "
                         "(mamba1_student_config(..., bias=True))")
    r = fresh["in_proj_dt"]["kernel"].shape[1]
    mixer_cfg = mamba1_student_config(teacher, [0], d_state=n, bias=has_bias).mixer_config(MAMBA).replace(dt_rank=r)
    in_proj, in_bias = fused_mamba1_in_proj(fresh, mixer_cfg)   # [z (di) | x (dxb) | B (dxb) | C (di) | dt_low (r)]
    dtype = in_proj.dtype
    attention = flat_attention_kernels(attention)
    cols = (mamba1_group_order(h, kv, dh, n)[:, None] * n + np.arange(n)).reshape(-1)
    C = attention["q_proj"]["kernel"][:, cols]
    in_proj = in_proj.at[:, di:di + dxb].set(attention["v_proj"]["kernel"].astype(dtype))
    in_proj = in_proj.at[:, di + dxb:di + 2 * dxb].set(attention["k_proj"]["kernel"].astype(dtype))
    in_proj = in_proj.at[:, di + 2 * dxb:2 * di + 2 * dxb].set(C.astype(dtype))
    out = dict(fresh)
    out["out_proj"] = {**fresh["out_proj"], "kernel": attention["o_proj"]["kernel"][cols].astype(dtype)}
    if conv_init == "identity":
        out["conv1d_kernel"] = jnp.zeros_like(fresh["conv1d_kernel"]).at[-1].set(1)
        if "conv1d_bias" in fresh:
            out["conv1d_bias"] = jnp.zeros_like(fresh["conv1d_bias"])
    if ssm_init == "linear_attention":
        in_proj = in_proj.at[:, -r:].set(0)                                               # Δ ignores the input
        if in_bias is not None:
            in_bias = in_bias.at[-r:].set(0)
        out["dt_proj_bias"] = jnp.full_like(fresh["dt_proj_bias"], math.log(math.expm1(1.0)))  # softplus = 1
        out["A_log"] = jnp.full_like(fresh["A_log"], math.log(LINEAR_ATTENTION_DECAY))
        out["D"] = jnp.zeros_like(fresh["D"])
    if gate_init == "open":
        in_proj = in_proj.at[:, :di].set(0)
        in_bias = in_bias.at[:di].set(MAMBA1_OPEN_GATE_BIAS)
        out["out_proj"]["bias"] = jnp.zeros_like(fresh["out_proj"]["bias"])
    out.update(split_mamba1_in_proj(in_proj, in_bias, mixer_cfg))
    return out


def attention_to_mamba1(teacher: TransformerConfig, teacher_params, rng, *, layers: Optional[Sequence[int]] = None,
                        fraction: Optional[float] = None, d_state: int = 16, conv_init: str = "identity",
                        ssm_init: str = "linear_attention",
                        gate_init: str = "open") -> Tuple[HybridConfig, Dict[str, Any]]:
    """A hybrid student with Mamba-1 (MambaInLlama form) mixers from a trained TransformerLM:
    (HybridConfig with "M" at the replaced layers, params). The arguments are `attention_to_mamba2`'s,
    with `d_state` (MambaInLlama: 16; must divide head_dim) in place of chunk_size; see
    `mamba1_mixer_from_attention` for where each weight lands and what the init options set."""
    _check_init_options("attention_to_mamba1", conv_init, ssm_init, gate_init)
    replaced = replaced_layers(teacher.n_layer, layers, fraction)
    config = mamba1_student_config(teacher, replaced, d_state=d_state, bias=gate_init == "open")
    mixer = lambda attention, fresh: mamba1_mixer_from_attention(
        attention, fresh, teacher, d_state=d_state, conv_init=conv_init, ssm_init=ssm_init, gate_init=gate_init)
    return config, _assemble_student("attention_to_mamba1", config, teacher_params, rng, replaced, mixer)


def extend_student(teacher: TransformerConfig, teacher_params, config: HybridConfig, params, rng, *,
                   layers: Optional[Sequence[int]] = None, fraction: Optional[float] = None,
                   conv_init: str = "identity", ssm_init: str = "linear_attention", gate_init: str = "open",
                   chunk_size: int = 256) -> Tuple[HybridConfig, Dict[str, Any]]:
    """Progressive replacement (e.g. stage 1 with 25 % of the layers replaced, then 50 %): the student
    for the layers L2 from the student (`config`, `params`) built with layers L1 ⊆ L2.

    Every parameter of `params` is carried over as it is (the trained mixers of L1 and everything else);
    the layers in L2 but not in L1 get new mixers of the student's form (Mamba-2 "M2", or the Mamba-1
    form "M" of `attention_to_mamba1`, with the student's d_state) initialised from the teacher's attention
    there, exactly as `attention_to_mamba2` / `attention_to_mamba1` (same options, which must give the
    mixer config `config` has: e.g. gate_init="open" ⇔ the student has mixer biases; `chunk_size` is
    Mamba-2's). `rng` draws the new mixers' fresh parts. Returns (HybridConfig with the mixer at L2, params).
    """
    if not isinstance(config, HybridConfig):
        raise ValueError(f"extend_student: `config` must be a HybridConfig; got {type(config).__name__}")
    forms = set(config.layer_kinds) - {"A"}
    if config.n_layer != teacher.n_layer or forms not in ({"M2"}, {"M"}):
        raise ValueError(f"extend_student: `config` ({config.pattern!r}) is not a student of this teacher "
                         f"({teacher.n_layer} attention layers, the others all 'M2' or all 'M')")
    kind = forms.pop()
    label = "Mamba-2" if kind == "M2" else "Mamba-1"
    old = tuple(i for i, k in enumerate(config.layer_kinds) if k == kind)
    new = replaced_layers(teacher.n_layer, layers, fraction)
    if not set(old) <= set(new):
        raise ValueError(f"extend_student: the new layers {list(new)} must contain the student's {label} layers "
                         f"{list(old)}")
    _check_init_options("extend_student", conv_init, ssm_init, gate_init)
    options = dict(conv_init=conv_init, ssm_init=ssm_init, gate_init=gate_init)
    if kind == "M2":
        want = mamba2_student_config(teacher, new, chunk_size=chunk_size, bias=gate_init == "open").mamba2
        have = config.mamba2
        build = lambda: attention_to_mamba2(teacher, teacher_params, rng, layers=new, chunk_size=chunk_size, **options)
    else:
        d_state = config.mamba.d_state
        want = mamba1_student_config(teacher, new, d_state=d_state, bias=gate_init == "open").mamba
        have = config.mamba
        build = lambda: attention_to_mamba1(teacher, teacher_params, rng, layers=new, d_state=d_state, **options)
    if want != have:
        raise ValueError(f"extend_student: the init options give a different {label} config from the student's "
                         f"({want} vs {have}); pass the options the student was built with")
    new_config, fresh = build()
    if set(params) != set(fresh):
        raise ValueError(f"extend_student: `params` do not match `config` (parts {sorted(params)})")
    out = dict(params)
    for i in sorted(set(new) - set(old)):
        name = f"layers_{i}"
        out[name] = {**params[name], "mixer": fresh[name]["mixer"]}
    return new_config, out


def new_mixer_mask(config: HybridConfig, params) -> Dict[str, Any]:
    """A pytree of bools like `params`: True on the parameters of the Mamba mixers ("M2" or "M" layers;
    stage 1 of MambaInLlama trains only those), False elsewhere."""
    kinds = config.layer_kinds

    def mark(path, _):
        keys = [getattr(p, "key", None) for p in path]
        if keys and isinstance(keys[0], str) and keys[0].startswith("layers_") and len(keys) > 1 \
                and keys[1] == "mixer":
            return kinds[int(keys[0].split("_")[1])] in ("M2", "M")
        return False

    return jax.tree_util.tree_map_with_path(mark, params)
