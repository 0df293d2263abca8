"""A Mixture-of-Experts feed-forward layer (Switch / top-k / expert-choice) over `mamba_jax.ops.moe`.

    cfg = MoEConfig(n_experts=8, router="switch", aux_loss_coef=0.01)
    y, metrics = MoE(cfg).apply({"params": params}, x, deterministic=False, rngs={"jitter": key})
    loss = task_loss + metrics["router_loss"]        # aux_loss_coef · aux_loss + z_loss_coef · z_loss

x: (b, l, d_model) -> y: (b, l, d_model). With a capacity factor, each sequence (batch row) is one routing
group by default: capacity and the (causal, token-major) drop order are per sequence (see `mamba_jax.ops.moe`
for the routing conventions); `routing_rows` groups several rows, or the whole batch as MoE-Mamba's code does
(position-major, so no row's future reaches its past: `to_routing_groups`); dropped tokens get y = 0, so the residual connection around the layer carries them
unchanged. With capacity factor None the layer is dropless: every token reaches its k experts, and its
output depends on nothing but its own input (the default in evaluation and decoding). An optional ``token_mask``
(b, l) (1 = real token, 0 = padding) keeps padding out of routing: no expert slot, y = 0, and no part in
the losses and metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mamba_jax.layers.config import DTYPES, MOE, BaseLMConfig, check_choice, check_positive_int
from mamba_jax.ops.moe import (ACTIVATIONS, DISPATCHES, ROUTERS, default_k, from_routing_groups, router_jitter,
                               to_routing_groups)
from mamba_jax.axes import EMBED, EXPERT, MLP
from mamba_jax.sharding.experts import expert_parallel_moe


def _check_number(owner: str, name: str, value, *, low: float, low_inclusive: bool, high: Optional[float] = None):
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{owner}: `{name}` must be a number {bound}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE layer's hyper-parameters.

    n_experts: E. router: "switch" (top-1), "topk" or "expert_choice".
    k: assignments per token; None = the router's default (switch 1, topk 2, expert_choice 1). The switch
       router needs k = 1; for expert choice k only scales the capacity (mean experts per token).
    capacity_factor_train / capacity_factor_eval: the causal capacity (`mamba_jax.ops.moe`): an expert keeps
       at most ceil(cf · (p + 1) · k / E) assignments of a document's first p + 1 tokens, in a buffer of
       C = ceil(cf · l · k / E) slots per expert per sequence (min 1, max l); or None: dropless (no capacity, nothing dropped; token-choice routers only). The eval
       factor is used when `deterministic=True`. Defaults: train 1.0, eval None — dropless evaluation and
       decoding, so decoding one token at a time equals the full forward and no token's output depends on
       another's. For expert choice (which has no dropless form) an eval factor of None means the train one.
    aux_loss_coef, z_loss_coef: weights of the Switch load-balancing loss and the router z-loss in
       `metrics["router_loss"]`.
    jitter: eps of the multiplicative U[1−eps, 1+eps] noise on the router input (train only; rng "jitter").
    dispatch: "dense" (one-hot einsum) or "sorted" (gather/scatter, no tokens × experts × capacity tensor).
    d_expert: hidden width of each expert FFN; None = 3 · d_model (MoE-Mamba's choice).
    activation: "relu" (Switch, MoE-Mamba), "gelu" or "silu". expert_bias: biases in the expert FFNs.
    dtype / param_dtype: of the expert computation and weights; the router is always float32.
    routing_rows: batch rows per routing group (capacity and load-balancing loss are computed per group):
       1 (default) = each sequence alone, so a sequence's output never depends on another's; None = the
       whole batch (MoE-Mamba's code: capacity = cf · b · l · k / E, the aux loss over the batch); r = groups
       of r rows (e.g. one device's batch shard). A group of several rows is ordered position-major
       (`mamba_jax.ops.moe.to_routing_groups`) and its causal capacity counts its tokens in that order;
       packed documents (`seq_idx`) then share their group's capacity.
    """

    n_experts: int = 8
    router: str = "switch"
    k: Optional[int] = None
    capacity_factor_train: Optional[float] = 1.0
    capacity_factor_eval: Optional[float] = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    jitter: float = 0.0
    dispatch: str = "dense"
    d_expert: Optional[int] = None
    activation: str = "relu"
    expert_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    routing_rows: Optional[int] = 1

    def __post_init__(self):
        owner = type(self).__name__
        check_positive_int(owner, "n_experts", self.n_experts)
        if self.routing_rows is not None:
            check_positive_int(owner, "routing_rows", self.routing_rows)
        check_choice(owner, "router", self.router, ROUTERS)
        if self.k is not None:
            check_positive_int(owner, "k", self.k)
            if self.k > self.n_experts:
                raise ValueError(f"{owner}: `k` ({self.k}) must be <= `n_experts` ({self.n_experts})")
            if self.router == "switch" and self.k != 1:
                raise ValueError(f"{owner}: `k` must be 1 (or None) for router='switch'; got {self.k!r} "
                                 "(use router='topk' for k > 1)")
        elif self.top_k > self.n_experts:
            raise ValueError(f"{owner}: `k` (default {self.top_k} for router={self.router!r}) must be <= "
                             f"`n_experts` ({self.n_experts}); set `k` or `n_experts`")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, name) is not None:
                _check_number(owner, name, getattr(self, name), low=0, low_inclusive=False)
        if self.router == "expert_choice" and self.capacity_factor_train is None:
            raise ValueError(f"{owner}: router='expert_choice' has no dropless form (each expert takes its top-C "
                             "tokens): `capacity_factor_train` must be a number > 0, not None")
        for name in ("aux_loss_coef", "z_loss_coef"):
            _check_number(owner, name, getattr(self, name), low=0, low_inclusive=True)
        _check_number(owner, "jitter", self.jitter, low=0, low_inclusive=True, high=1)
        check_choice(owner, "dispatch", self.dispatch, DISPATCHES)
        if self.d_expert is not None:
            check_positive_int(owner, "d_expert", self.d_expert)
        check_choice(owner, "activation", self.activation, tuple(ACTIVATIONS))
        for name in ("dtype", "param_dtype"):
            check_choice(owner, name, getattr(self, name), DTYPES)

    @property
    def top_k(self) -> int:
        """The k used for routing and capacity (the router's default when `k` is None)."""
        return default_k(self.router) if self.k is None else self.k

    def expert_width(self, d_model: int) -> int:
        return 3 * d_model if self.d_expert is None else self.d_expert

    def capacity_factor(self, deterministic: bool) -> Optional[float]:
        """The capacity factor in use (None: dropless)."""
        if not deterministic or (self.router == "expert_choice" and self.capacity_factor_eval is None):
            return self.capacity_factor_train
        return self.capacity_factor_eval

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


class MoE(nn.Module):
    """Router (Dense d_model → E, float32, no bias) + E two-layer FFN experts.

    Params: router/kernel (d_model, E) [EMBED, None]; w_in (E, d_model, d_expert) [EXPERT, EMBED, MLP];
    w_out (E, d_expert, d_model) [EXPERT, MLP, EMBED]; with `expert_bias`, b_in (E, d_expert) [EXPERT, MLP]
    and b_out (E, d_model) [EXPERT, EMBED].

    __call__(x, deterministic=True, token_mask=None, seq_idx=None) -> (y, metrics): x (b, l, d_model); y like
    x (dtype of x); metrics: aux_loss, z_loss, router_loss (weighted sum), dropped_fraction, unrouted_fraction
    (scalars), expert_load (E,). `deterministic=False` uses `capacity_factor_train` and, when `jitter` > 0,
    the "jitter" rng stream. token_mask: optional (b, l), 1 = real token, 0 = padding: padding takes no
    expert capacity, gets y = 0 and is left out of every loss and metric. seq_idx: optional (b, l) int,
    packed documents: the causal capacity restarts at each (a document's routing ignores the others).
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True, token_mask=None, seq_idx=None) -> Tuple[Any, Dict[str, Any]]:
        cfg = self.config
        if x.ndim != 3:
            raise ValueError(f"MoE: `x` must have shape (b, l, d_model); got shape {tuple(x.shape)}")
        if token_mask is not None and tuple(getattr(token_mask, "shape", ())) != tuple(x.shape[:2]):
            raise ValueError(f"MoE: `token_mask` must have shape (b, l) = {tuple(x.shape[:2])} like `x`; "
                             f"got {tuple(getattr(token_mask, 'shape', ())) or type(token_mask).__name__}")
        d_model, n_exp = x.shape[-1], cfg.n_experts
        d_expert = cfg.expert_width(d_model)
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        router_dtype = jnp.promote_types(jnp.float32, x.dtype)   # float32, or float64 for float64 inputs

        router_in = x.astype(router_dtype)
        if not deterministic and cfg.jitter > 0:
            router_in = router_jitter(router_in, self.make_rng("jitter"), cfg.jitter)
        logits = nn.Dense(n_exp, use_bias=False, dtype=router_dtype, param_dtype=jnp.float32, name="router",
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal"), (EMBED, None)),
                          )(router_in)

        def expert_init(axes):
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=-2, out_axis=-1, batch_axis=(0,))
            return nn.with_logical_partitioning(init, axes)

        w_in = self.param("w_in", expert_init((EXPERT, EMBED, MLP)), (n_exp, d_model, d_expert), pdt)
        w_out = self.param("w_out", expert_init((EXPERT, MLP, EMBED)), (n_exp, d_expert, d_model), pdt)
        b_in = b_out = None
        if cfg.expert_bias:
            zeros = nn.initializers.zeros
            b_in = self.param("b_in", nn.with_logical_partitioning(zeros, (EXPERT, MLP)), (n_exp, d_expert), pdt)
            b_out = self.param("b_out", nn.with_logical_partitioning(zeros, (EXPERT, EMBED)), (n_exp, d_model), pdt)

        rows = x.shape[0] if cfg.routing_rows is None else cfg.routing_rows
        if rows > 1:
            if x.shape[0] % rows:
                raise ValueError(f"MoE: the batch ({x.shape[0]} sequences) must be divisible by `routing_rows`="
                                 f"{rows} (MoEConfig)")
            x, logits = to_routing_groups(x, rows), to_routing_groups(logits, rows)
            token_mask = None if token_mask is None else to_routing_groups(jnp.asarray(token_mask), rows)
            seq_idx = None
        # on a mesh with an `expert` axis: experts split over it, tokens exchanged with all-to-all
        y, metrics = expert_parallel_moe(x, logits, w_in, w_out, b_in, b_out, activation=cfg.activation,
                                         router=cfg.router, k=cfg.top_k,
                                         capacity_factor=cfg.capacity_factor(deterministic),
                                         dispatch=cfg.dispatch, compute_dtype=cdt, token_mask=token_mask,
                                         seq_idx=seq_idx)
        if rows > 1:
            y = from_routing_groups(y, rows)
        metrics = dict(metrics)
        metrics["router_loss"] = cfg.aux_loss_coef * metrics["aux_loss"] + cfg.z_loss_coef * metrics["z_loss"]
        return y, metrics


@dataclasses.dataclass(frozen=True)
class MoEBlockConfig(BaseLMConfig):
    """An MoE feed-forward layer as a layer of a pattern ("E" in `HybridConfig.pattern`): the block is
    ``h += MoE(norm(h))``. `moe` holds the routing and expert settings; its dtypes follow this config's.
    The layer sits in causal decoders, so expert-choice routing (each expert ranks the whole sequence,
    later tokens included) is refused here; the `MoE` module itself keeps it for bidirectional models.
    """

    family: ClassVar[str] = "moe"

    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"MoEBlockConfig: `moe` must be a MoEConfig; got {type(self.moe).__name__}")
        if self.moe.router == "expert_choice":
            raise ValueError("MoEBlockConfig: router='expert_choice' is not causal — each expert picks its tokens "
                             "over the whole sequence, later tokens included, so a token's output would depend on "
                             "the future — and is refused in decoder models; use router='switch' or 'topk' "
                             "(expert choice stays available in the `MoE` layer for bidirectional models)")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (MOE,) * self.n_layer

    def mixer_config(self, kind: str) -> "MoEBlockConfig":
        return self

    @property
    def moe_config(self) -> MoEConfig:
        return self.moe.replace(dtype=self.dtype, param_dtype=self.param_dtype)

    @classmethod
    def from_dict(cls, raw):
        raw = dict(raw)
        if isinstance(raw.get("moe"), dict):
            raw["moe"] = MoEConfig(**raw["moe"])
        return super().from_dict(raw)


class MoEMixer(nn.Module):
    """The "E" layer of a pattern: the `MoE` FFN behind the block interface of the mixers.

    ``(x, positions, seq_idx, mask, cache, deterministic) -> (y, cache)``; x (b, l, d_model). Keeps no cache
    and ignores positions; `seq_idx` restarts the training capacity at each packed document. `deterministic=False` trains (train capacity factor, jitter: the train step
    passes it through the model); True (the default) evaluates — dropless by default, so the layer is
    token-wise and decoding equals the forward. It sows ``losses/router_loss`` (aux_loss_coef·aux +
    z_loss_coef·z, to add to the objective) and ``moe_metrics/{dropped_fraction, aux_loss, z_loss}``, read
    when the caller makes those collections mutable.
    `mask` (b, l) (1 = real token, 0 = left padding, as the model's `mask`) keeps padding out of routing:
    padding takes no expert capacity, gets a zero output and counts in no loss or metric.
    """

    config: MoEBlockConfig

    @nn.compact
    def __call__(self, x, *, positions=None, seq_idx=None, mask=None, cache=None, deterministic: bool = True,
                 step_caches: bool = False):
        del step_caches   # token-wise: no cache
        y, metrics = MoE(self.config.moe_config, name="moe")(x, deterministic=deterministic, token_mask=mask,
                                                             seq_idx=seq_idx)
        self.sow("losses", "router_loss", metrics["router_loss"])
        for name in ("dropped_fraction", "aux_loss", "z_loss"):
            self.sow("moe_metrics", name, metrics[name])
        return y, cache
