"""The model families the invariants run on, and parameters at a trained scale.

Every layer kind the library offers appears: Mamba-1 ("M", each scan impl that runs on CPU — Pallas
interpreted — and MambaInLlama's attention-initialisable form), Mamba-2 ("M2", each SSD impl), attention ("A", rotary with GQA, learned
positions), MoE ("E", each causal router; expert choice is refused in decoders), Mamba + MoE in parallel
("P"), hybrids mixing them, and M2R2's fast stream over a hybrid (residual rate and adapters). Sizes are tiny (compile time is what the suite pays for) but the parameters
are not at their initialisation: `trained_scale` moves every weight off its init and shifts Δ so that
decay matters — at initialisation the SSM barely changes the logits, so a state bug would pass unseen
(see `test_state_matters`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.layers.moe import MoEBlockConfig, MoEConfig
from mamba_jax.models import HybridConfig, HybridLM, Mamba2LM, MambaLM, TransformerLM, init_params
from mamba_jax.models.m2r2 import fast_stream

VOCAB = 61            # padded to 64 rows: ids in [61, 64) would read padding rows if not clipped
D_MODEL = 16
HALF = 16             # the invariants' sequences have 2 · HALF tokens (a multiple of E / (cf · k), below)
MOE = MoEConfig(n_experts=4, router="switch", capacity_factor_train=0.5, d_expert=24)   # binds in training

_common = dict(vocab_size=VOCAB, d_model=D_MODEL)
_mamba = MambaConfig(d_state=4, chunk_size=8)
_mamba2 = Mamba2Config(d_state=8, head_dim=8, chunk_size=8)
# whole heads on tensor=4; attention blocks of 12 (5 for A[learned]): decoding and chunked prefill read
# several blocks of the cache, the last one shifted back, and a block of the uncached forward straddles
# position HALF, so a leak from the future inside a block shows in the prefix-causality check
_attention = TransformerConfig(n_heads=8, n_kv_heads=4, head_dim=4, d_intermediate=32, kv_block_size=12)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], object]       # -> a DecoderLM
    kinds: Tuple[str, ...]            # its layer kinds
    moe: bool = False                 # has an MoE layer (train mode differs from eval)
    attention: bool = False           # has a KV cache (decoding needs max_len)


def _hybrid(pattern, **sub):
    return HybridLM(HybridConfig(pattern=pattern, **_common, mamba=sub.get("mamba", _mamba),
                                 mamba2=sub.get("mamba2", _mamba2), attention=sub.get("attention", _attention),
                                 moe=MoEBlockConfig(moe=sub.get("moe", MOE))))


FAMILIES: Dict[str, Family] = {f.name: f for f in [
    *[Family(f"M[{impl}]", lambda impl=impl: MambaLM(MambaConfig(**_common, n_layer=2, d_state=4, scan_impl=impl,
                                                                  chunk_size=8)), ("M",))
      for impl in ("reference", "associative", "chunked", "chunked_associative", "pallas")],
    Family("M[lti]", lambda: MambaLM(MambaConfig(**_common, n_layer=2, d_state=4, selective=False,
                                                 scan_impl="chunked", chunk_size=8)), ("M",)),
    Family("M[input-form]", lambda: MambaLM(MambaConfig(**_common, n_layer=2, d_state=4, bc_source="input", d_xb=16, dt_rank=4,
                                                         scan_impl="chunked", chunk_size=8)), ("M",)),
    *[Family(f"M2[{impl}]", lambda impl=impl: Mamba2LM(Mamba2Config(**_common, n_layer=2, d_state=8, head_dim=8,
                                                                     n_groups=2, chunk_size=8, scan_impl=impl)),
             ("M2",)) for impl in ("reference", "chunked", "pallas")],
    Family("A[rope,gqa]", lambda: TransformerLM(TransformerConfig(**_common, n_layer=2, n_heads=8, n_kv_heads=4,
                                                                  head_dim=4, d_intermediate=32, kv_block_size=12)),
           ("A",),
           attention=True),
    Family("A[learned]", lambda: TransformerLM(TransformerConfig(**_common, n_layer=2, n_heads=2, d_intermediate=32,
                                                                 kv_block_size=5,
                                                                 position_embedding="learned",
                                                                 max_position_embeddings=64)), ("A",),
           attention=True),
    Family("M E[switch]", lambda: _hybrid("M E"), ("M", "E"), moe=True),
    Family("M2 E[topk]", lambda: _hybrid("M2 E", moe=dataclasses.replace(MOE, router="topk")), ("M2", "E"),
           moe=True),
    Family("P P", lambda: _hybrid("P P"), ("P",), moe=True),
    Family("M A M2 E", lambda: _hybrid("M A M2 E", moe=dataclasses.replace(MOE, router="topk", k=2)),
           ("M", "A", "M2", "E"), moe=True, attention=True),
    # M2R2's fast stream (`fast_stream`): the first 2 of 4 layers at residual rate 2 with rank-4 adapters
    Family("fast[M A]", lambda: fast_stream(_hybrid("M A M A"), 2, rank=4), ("M", "A"), attention=True),
]}


# Compared sharded against unsharded (tests/invariants/sharded_checks.py): one family per layer kind ("M",
# "M2", "A", "E", "P") and the hybrid mixing them; the Mamba-1 input form on a tensor mesh is in
# tests/sharding/multi_device_checks.py.
SHARDED_FAMILIES = ("M[chunked]", "M2[chunked]", "A[rope,gqa]", "M E[switch]", "P P", "M A M2 E")


def trained_scale(params, seed: int = 0):
    """Parameters moved off their initialisation to the scale of a trained model (a pure function).

    Every leaf gets Gaussian noise of half its own spread (at least 0.05; for matrices 0.5/sqrt(fan_in)),
    the embeddings are scaled up (trained embeddings dwarf the 0.02 init), the Δ biases are shifted by +3
    so Δ = softplus(bias) lies in ~[0.02, 1] (decay per step exp(Δ·A) from ~1 to ~e^-16: the state both
    carries and forgets), A_log is jittered, and MoE routers are sharpened (so capacity binds).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for (path, w), key in zip(leaves, keys):
        names = [getattr(p, "key", "") for p in path]
        name = names[-1]
        w = jnp.asarray(w)
        dtype = w.dtype
        noise = jax.random.normal(key, w.shape, jnp.float32)
        if name in ("dt_proj_bias", "dt_bias"):
            w = w + 3.0 + 0.3 * noise
        elif name == "A_log":
            w = w + 0.5 * noise
        elif name == "embedding":
            w = 0.5 * noise
        elif w.ndim >= 2:
            fan_in = w.shape[-2]
            spread = max(float(jnp.std(w)), 0.5 / math.sqrt(fan_in))
            w = w + spread * noise
            if "router" in names:
                w = 4.0 * w
        else:
            w = w + max(0.5 * float(jnp.std(w)), 0.1) * noise
        out.append(w.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


_PARAMS = {}


def model_and_params(name: str):
    """(model, trained-scale params) of a family, cached per process."""
    if name not in _PARAMS:
        model = FAMILIES[name].build()
        _PARAMS[name] = (model, trained_scale(init_params(model, jax.random.PRNGKey(0), seq_len=4)))
    return _PARAMS[name]


def tokens(seed: int, batch: int, length: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)
