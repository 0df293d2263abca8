"""MoE-Mamba (Pióro et al., arXiv 2401.04081): Mamba layers interleaved with Switch MoE feed-forward layers.

The model is a `HybridLM` over the pattern "M E M E ..." ("E" = `mamba_jax.layers.moe.MoEMixer`, pre-norm
residual: h += MoE(norm(h))); the paper's baseline is plain Mamba with twice the layers: a Mamba layer
(expand 2) has ~6·d_model² weights and a top-1 expert with d_expert = 3·d_model also ~6·d_model², so the
active parameters per token match closely. `parameter_counts` reports both models' numbers.

    config = moe_mamba_config("25m", vocab_size=...)          # d_model 512, 8 blocks, 42 experts
    baseline = mamba_baseline_config(config)                  # 16 Mamba layers, same width
    counts = parameter_counts(config, params)                 # total / active per token / experts

``parallel=True`` builds the paper's parallel variant: the pattern "P P ..." (`mamba_jax.layers.mamba_moe`,
h += Mamba(norm(h)) + MoE(norm(h)) in each block) with the same sublayers.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import jax

from mamba_jax.layers.config import MAMBA, MAMBA_MOE, MOE
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba_moe import ParallelMambaMoE, ParallelMambaMoEConfig  # noqa: F401 (re-exported)
from mamba_jax.layers.moe import MoEBlockConfig, MoEConfig
from mamba_jax.models.hybrid import HybridConfig

# The paper's two settings (Table 1 / Sec. 4): d_model, MoE-Mamba blocks (Mamba + MoE each), experts.
PAPER_SETTINGS = {"25m": dict(d_model=512, n_blocks=8, n_experts=42),
                  "100m": dict(d_model=768, n_blocks=16, n_experts=42)}


def moe_mamba_config(setting: str = "25m", *, vocab_size: int, n_experts: int = None, d_model: int = None,
                     n_blocks: int = None, router: str = "switch", capacity_factor: float = 1.0,
                     aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, jitter: float = 0.0,
                     dispatch: str = "sorted",
                     expand: int = 2, d_state: int = 16, d_expert: int = None, scan_impl: str = "auto",
                     parallel: bool = False, routing_rows: Optional[int] = 1, **common) -> HybridConfig:
    """A MoE-Mamba HybridConfig: `n_blocks` × (Mamba layer, Switch MoE layer), sequential as in the
    paper's main model; ``parallel=True`` (the paper's parallel ablation): `n_blocks` "P" layers, each
    h += Mamba(norm(h)) + MoE(norm(h)) with the same sublayers (one norm per block instead of two).

    Defaults follow the paper: top-1 (Switch) routing, capacity factor 1 in training, load-balancing
    α = 0.01, no z-loss, experts d_expert = 3·d_model with ReLU; evaluation and decoding are dropless (a
    causal model's eval loss must not depend on later tokens through capacity). `jitter`: the router-input jitter eps (Switch; 0 = off;
    training then needs a "jitter" rng, e.g. ``make_train_step(rng=seed)``). `setting` "25m" / "100m"
    fills d_model, n_blocks and n_experts (explicit arguments win). `scan_impl`: the Mamba layers' selective-scan implementation.
    `routing_rows`: rows per routing group (`MoEConfig.routing_rows`): 1 (the default) = each sequence alone;
    None = the whole batch, as the authors' code (llm-random) computes capacity and the balancing loss over
    all of a batch's tokens (position-major, so nothing reaches a row's past from its future).
    `common`: other BaseLMConfig fields (dtype, remat, ...).
    """
    if setting not in PAPER_SETTINGS:
        raise ValueError(f"moe_mamba_config: `setting` must be one of {tuple(PAPER_SETTINGS)}; got {setting!r}")
    base = PAPER_SETTINGS[setting]
    d_model = base["d_model"] if d_model is None else d_model
    n_blocks = base["n_blocks"] if n_blocks is None else n_blocks
    n_experts = base["n_experts"] if n_experts is None else n_experts
    moe = MoEConfig(n_experts=n_experts, router=router, capacity_factor_train=capacity_factor,
                    capacity_factor_eval=None, aux_loss_coef=aux_loss_coef,
                    z_loss_coef=z_loss_coef, jitter=jitter, dispatch=dispatch, d_expert=d_expert,
                    routing_rows=routing_rows)
    block = MAMBA_MOE if parallel else f"{MAMBA} {MOE}"
    return HybridConfig(pattern=" ".join([block] * n_blocks), vocab_size=vocab_size, d_model=d_model,
                        mamba=MambaConfig(expand=expand, d_state=d_state, scan_impl=scan_impl),
                        moe=MoEBlockConfig(moe=moe), **common)


def mamba_baseline_config(config: HybridConfig) -> MambaConfig:
    """The paper's dense baseline of a MoE-Mamba config: plain Mamba with the same width and one Mamba
    layer in place of each MoE layer (twice the Mamba layers of the MoE model)."""
    m = config.mixer_config(MAMBA)
    n_layer = sum(2 if kind == MAMBA_MOE else 1 for kind in config.layer_kinds)
    return MambaConfig(vocab_size=config.vocab_size, d_model=config.d_model, n_layer=n_layer,
                       d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, dtype=config.dtype,
                       param_dtype=config.param_dtype, tie_embeddings=config.tie_embeddings,
                       remat=config.remat, scan_impl=m.scan_impl)


def parameter_counts(config: HybridConfig, params) -> Dict[str, Any]:
    """Parameters of a (MoE-)hybrid model: ``total``; ``expert`` (all experts' FFN weights); ``active``
    per token (everything else plus k/E of the experts — one expert of each MoE layer for Switch);
    ``embedding`` (counted in both). params: the model's `params` tree."""
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = math.prod(leaf.shape)
        total += size
        keys = [getattr(p, "key", "") for p in path]
        if "moe" in keys and keys[-1] in ("w_in", "w_out", "b_in", "b_out"):
            expert += size
    has_moe = MOE in config.layer_kinds or MAMBA_MOE in config.layer_kinds
    moe = config.mixer_config(MOE).moe if has_moe else None
    fraction = 0.0 if moe is None else min(moe.top_k, moe.n_experts) / moe.n_experts
    embedding = math.prod(params["embeddings"]["embedding"].shape)
    return {"total": total, "expert": expert, "active": total - expert + int(round(expert * fraction)),
            "embedding": embedding}

