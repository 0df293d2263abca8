"""Attention → Mamba-2 initialisation (MambaInLlama, arXiv 2408.15237; M1, arXiv 2504.10449).

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
denominator. The student has one Mamba-2 head per attention head: headdim = d_state = head_dim, ngroups =
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

Shapes (flax, kernels stored (in, out)): teacher q_proj (d_model, h·dh), k_proj/v_proj (d_model, kv·dh),
o_proj (h·dh, d_model); student in_proj (d_model, 2·d_inner + 2·h·dh + h), out_proj (d_inner, d_model).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.mamba2 import Mamba2Config
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
    head (headdim = d_state = head_dim, ngroups = n_heads), MLPs as the teacher's. `bias`: the Mamba-2
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
    mamba2 = Mamba2Config(expand=d_inner // teacher.d_model, headdim=dh, d_state=dh, ngroups=h, bias=bool(bias),
                          chunk_size=chunk_size, d_intermediate=teacher.d_intermediate, mlp_bias=teacher.mlp_bias,
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


def mamba2_mixer_from_attention(attention: Dict[str, Any], fresh: Dict[str, Any], teacher: TransformerConfig, *,
                                conv_init: str = "identity", ssm_init: str = "linear_attention",
                                gate_init: str = "open") -> Dict[str, Any]:
    """The params of one student Mamba-2 mixer: `fresh` (its own initialisation) with in_proj's x, B, C
    columns and out_proj taken from the `attention` params (q_proj, k_proj, v_proj, o_proj), and the conv,
    Δ, A, D and gate set as the options say (module docstring; "fresh" keeps `fresh`'s values).

    in_proj kernel (d_model, 2·d_inner + 2·h·dh + h) columns: [z | x | B | C | dt]; conv1d_kernel (k, conv_dim);
    dt_bias, A_log, D (h,). gate_init="open" needs `fresh` to have in_proj/out_proj biases (`bias=True`).
    """
    _check_init_options("mamba2_mixer_from_attention", conv_init, ssm_init, gate_init)
    h, kv, dh = teacher.n_heads, teacher.kv_heads, teacher.head_dim_value
    d_inner, gn = h * dh, h * dh
    in_proj = fresh["in_proj"]["kernel"]
    want = 2 * d_inner + 2 * gn + h
    if in_proj.shape != (teacher.d_model, want):
        raise ValueError(f"mamba2_mixer_from_attention: the student's in_proj kernel is {in_proj.shape}, expected "
                         f"{(teacher.d_model, want)} for one Mamba-2 head per attention head")
    if gate_init == "open" and ("bias" not in fresh["in_proj"] or "bias" not in fresh["out_proj"]):
        raise ValueError("mamba2_mixer_from_attention: gate_init='open' needs a student with Mamba-2 biases "
                         "(mamba2_student_config(..., bias=True))")
    dtype = in_proj.dtype
    x = _repeat_heads(attention["v_proj"]["kernel"], kv, h, dh)
    B = _repeat_heads(attention["k_proj"]["kernel"], kv, h, dh)
    C = attention["q_proj"]["kernel"]
    # in_proj columns: [z (d_inner) | x (d_inner) | B (h·dh) | C (h·dh) | dt (h)]
    in_proj = in_proj.at[:, d_inner:2 * d_inner].set(x.astype(dtype))
    in_proj = in_proj.at[:, 2 * d_inner:2 * d_inner + gn].set(B.astype(dtype))
    in_proj = in_proj.at[:, 2 * d_inner + gn:2 * d_inner + 2 * gn].set(C.astype(dtype))
    out = dict(fresh)
    out["in_proj"] = {**fresh["in_proj"], "kernel": in_proj}
    out["out_proj"] = {**fresh["out_proj"], "kernel": attention["o_proj"]["kernel"].astype(dtype)}
    if conv_init == "identity":
        k = fresh["conv1d_kernel"]
        out["conv1d_kernel"] = jnp.zeros_like(k).at[-1].set(1)
        if "conv1d_bias" in fresh:
            out["conv1d_bias"] = jnp.zeros_like(fresh["conv1d_bias"])
    if ssm_init == "linear_attention":
        out["in_proj"]["kernel"] = out["in_proj"]["kernel"].at[:, -h:].set(0)           # Δ ignores the input
        out["dt_bias"] = jnp.full_like(fresh["dt_bias"], math.log(math.expm1(1.0)))      # softplus(dt_bias) = 1
        out["A_log"] = jnp.full_like(fresh["A_log"], math.log(LINEAR_ATTENTION_DECAY))
        out["D"] = jnp.zeros_like(fresh["D"])
    if gate_init == "open":
        out["in_proj"]["kernel"] = out["in_proj"]["kernel"].at[:, :d_inner].set(0)
        out["in_proj"]["bias"] = jnp.zeros_like(fresh["in_proj"]["bias"]).at[:d_inner].set(OPEN_GATE_BIAS)
        out["out_proj"]["bias"] = jnp.zeros_like(fresh["out_proj"]["bias"])
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
    student = init_params(HybridLM(config), rng)
    missing = [name for name in student if name not in teacher_params and not name.startswith("layers_")]
    if missing or set(teacher_params) - set(student):
        raise ValueError(f"attention_to_mamba2: `teacher_params` do not match the teacher config (student "
                         f"parts {sorted(student)}, teacher parts {sorted(teacher_params)})")
    params = {}
    for name, value in student.items():
        if not name.startswith("layers_"):
            params[name] = teacher_params[name]
            continue
        layer = dict(teacher_params[name])
        if int(name.split("_")[1]) in replaced:
            layer["mixer"] = mamba2_mixer_from_attention(teacher_params[name]["mixer"], value["mixer"], teacher,
                                                         conv_init=conv_init, ssm_init=ssm_init,
                                                         gate_init=gate_init)
        params[name] = layer
    # own buffers: a train step that donates the student's state must not delete the teacher's arrays
    params = jax.tree_util.tree_map(jnp.copy, params)
    shapes_ok = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: np.shape(a) == np.shape(b), params, student))
    if not shapes_ok:
        raise ValueError("attention_to_mamba2: a copied parameter's shape differs from the student's")
    return config, params


def extend_student(teacher: TransformerConfig, teacher_params, config: HybridConfig, params, rng, *,
                   layers: Optional[Sequence[int]] = None, fraction: Optional[float] = None,
                   conv_init: str = "identity", ssm_init: str = "linear_attention", gate_init: str = "open",
                   chunk_size: int = 256) -> Tuple[HybridConfig, Dict[str, Any]]:
    """Progressive replacement (e.g. stage 1 with 25 % of the layers replaced, then 50 %): the student
    for the layers L2 from the student (`config`, `params`) built with layers L1 ⊆ L2.

    Every parameter of `params` is carried over as it is (the trained Mamba-2 mixers of L1 and everything
    else); the layers in L2 but not in L1 get new Mamba-2 mixers initialised from the teacher's attention there,
    exactly as `attention_to_mamba2` (same options, which must give the Mamba-2 config `config` has:
    e.g. gate_init="open" ⇔ the student has Mamba-2 biases). `rng` draws the new mixers' fresh parts.
    Returns (HybridConfig with "M2" at L2, params).
    """
    if not isinstance(config, HybridConfig):
        raise ValueError(f"extend_student: `config` must be a HybridConfig; got {type(config).__name__}")
    old = tuple(i for i, kind in enumerate(config.layer_kinds) if kind == "M2")
    new = replaced_layers(teacher.n_layer, layers, fraction)
    if config.n_layer != teacher.n_layer or set(config.layer_kinds) - {"M2", "A"}:
        raise ValueError(f"extend_student: `config` ({config.pattern!r}) is not a student of this teacher "
                         f"({teacher.n_layer} attention layers)")
    if not set(old) <= set(new):
        raise ValueError(f"extend_student: the new layers {list(new)} must contain the student's Mamba-2 layers "
                         f"{list(old)}")
    _check_init_options("extend_student", conv_init, ssm_init, gate_init)
    want = mamba2_student_config(teacher, new, chunk_size=chunk_size, bias=gate_init == "open")
    if old and want.mamba2 != config.mamba2:
        raise ValueError("extend_student: the init options give a different Mamba-2 config from the student's "
                         f"({want.mamba2} vs {config.mamba2}); pass the options the student was built with")
    new_config, fresh = attention_to_mamba2(teacher, teacher_params, rng, layers=new, conv_init=conv_init,
                                            ssm_init=ssm_init, gate_init=gate_init, chunk_size=chunk_size)
    if set(params) != set(fresh):
        raise ValueError(f"extend_student: `params` do not match `config` (parts {sorted(params)})")
    out = dict(params)
    for i in sorted(set(new) - set(old)):
        name = f"layers_{i}"
        out[name] = {**params[name], "mixer": fresh[name]["mixer"]}
    return new_config, out


def new_mixer_mask(config: HybridConfig, params) -> Dict[str, Any]:
    """A pytree of bools like `params`: True on the parameters of the Mamba-2 mixers (stage 1 of
    MambaInLlama trains only those), False elsewhere."""
    kinds = config.layer_kinds

    def mark(path, _):
        keys = [getattr(p, "key", None) for p in path]
        if keys and isinstance(keys[0], str) and keys[0].startswith("layers_") and len(keys) > 1 \
                and keys[1] == "mixer":
            return kinds[int(keys[0].split("_")[1])] == "M2"
        return False

    return jax.tree_util.tree_map_with_path(mark, params)
