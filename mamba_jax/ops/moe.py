"""Mixture-of-Experts routing and dispatch as pure jnp functions (no Flax).

Shapes: tokens come in groups, ``x: (g, t, d)`` with router logits ``logits: (g, t, E)``; routing,
capacity and dropping are computed independently per group (the MoE layer uses one group per sequence,
so a sequence's output never depends on the other sequences in the batch). ``E`` = number of experts,
``C`` = expert capacity (slots per expert per group), ``k`` = assignments per token.

Conventions (Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020; expert choice,
Zhou et al. 2022):

- **Router in float32.** Logits are cast to at least float32 (float64 stays float64, so float64 gradient
  checks are meaningful) and softmaxed over experts.
- **Capacity** (causal): an expert may keep at most ``cap[p] = ceil(capacity_factor · (p + 1) · k / E)``
  assignments of a document's first p + 1 tokens (`prefix_capacity`), so the row buffer
  ``C = ceil(capacity_factor · t · k / E)`` (at least 1, at most t; `expert_capacity`) holds everything kept.
  Slots are granted in token order (a token's k choices go to distinct experts); an assignment is dropped
  when its expert has used its budget so far. The decision depends only on the token's own document up to
  and including the token: never on later tokens, nor on the sequence length, left padding or other packed
  documents (`seq_idx`; exactly so when each document's length is a multiple of E / (capacity_factor · k) —
  otherwise a full row buffer can drop a later document's assignments). A fixed budget C per sequence
  (GShard, Switch) makes early tokens' fate depend on the length t, and GShard's choice-major order (all
  first choices before any second choice) lets a later token's first choice evict an earlier token's
  second: both leak across positions in a causal model. See `causal_slots`.
- **Dropless** (``capacity_factor=None``, `mixture_of_experts_dropless`): every assignment is computed, with
  a grouped matmul over the assignments sorted by expert (`jax.lax.ragged_dot`, O(t·k·d·f) work): routing is
  then token-wise, so a token's output depends on nothing but itself (the decoder models' default in
  evaluation and decoding, where decoding one token at a time must equal the full forward).
- **Expert choice** (``router="expert_choice"``): each expert takes its top-C tokens by router
  probability (ties: lower token index first); gate = p_e(token), with a fixed budget
  C = `expert_capacity`(t, E, k, capacity_factor). A token may be taken by several experts or by none.
  Represented token-major with k = E (assignment j of every token is expert j). It ranks a token against
  the whole group, later tokens included, so it is for bidirectional models only (the decoder "E" layer
  refuses it).
- **Dropped tokens** get zero output from the layer; the residual connection around it carries them.
- **Padding** (``token_mask: (g, t)``, 1 = real token, 0 = padding; optional everywhere, None = all real):
  padding tokens are kept out of routing. They take no expert slot (so they never cause a real token to
  be dropped, and the causal budget counts real tokens only; the buffer C is sized from the padded length t),
  expert choice never picks them,
  their output is zero, and they count in none of the metrics: the aux loss's f_e and P_e, the z-loss,
  the dropped / unrouted fractions are computed over real tokens only (a group with no real token adds
  nothing to the aux loss's mean over groups).
- **Aux loss** (Switch load balancing) per group ``E · Σ_e f_e · P_e``, f_e = fraction of tokens whose
  top-1 expert is e (before dropping), P_e = mean router probability of e; averaged over groups.
  **Router z-loss** = mean over tokens of ``logsumexp(logits)²``. Fractions (dropped, unrouted) and the
  z-loss are means over all (real) tokens of the batch; the aux loss a mean over groups.

Two dispatch paths give the same values and gradients:

- ``"dense"``: GShard one-hot einsums through a (g, t, E, C) dispatch/combine tensor; slot positions by
  a cumulative sum over one-hot expert masks. Simple; memory O(t·E·C) per group.
- ``"sorted"``: slot positions by a stable sort of the assignments by expert; tokens gathered into the
  (g, E, C, d) expert buffers through a (g, E·C) index array, outputs gathered back per assignment.
  Never builds a tokens × experts × capacity tensor: memory O(E·C·d + t·k·d) per group.

The expert computation is a callable ``expert_fn: (g, E, C, d) -> (g, E, C, d_out)`` (e.g. `expert_ffn`),
so the layer, and sharded versions of it, choose how the experts run.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops._checks import check_array, compute_dtype
from mamba_jax.ops.positions import segment_starts, token_positions

ROUTERS = ("switch", "topk", "expert_choice")
DISPATCHES = ("dense", "sorted")
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


class Routing(NamedTuple):
    """Token-major routing decisions of a batch of groups (all arrays (g, t, k)).

    expert:   int32, the expert of each assignment (for expert choice, assignment j is expert j).
    position: int32, the assignment's slot in its expert's buffer, in [0, C); == C when dropped.
    gate:     float, the combine weight; 0 where dropped.
    kept:     bool, position < C.
    """

    expert: jax.Array
    position: jax.Array
    gate: jax.Array
    kept: jax.Array


# ----------------------------------------------------------------------------------------------- checks

def _check_choice(fn, name, value, choices):
    if value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {tuple(choices)}; got {value!r}")


def _check_k(fn, k, n_experts):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: `k` must be a positive int; got {k!r}")
    if k > n_experts:
        raise ValueError(f"{fn}: `k` ({k}) must be <= the number of experts ({n_experts})")


def _check_logits(fn, logits):
    check_array(fn, "logits", logits, ("g", "t", "E"))


def _check_token_mask(fn, token_mask, g, t):
    """token_mask: None or (g, t) of any dtype (nonzero / True = real token) -> None or (g, t) bool."""
    if token_mask is None:
        return None
    check_array(fn, "token_mask", token_mask, (g, t), kind="any")
    return token_mask.astype(bool)


def default_k(router: str) -> int:
    """The k of a router when none is given: switch 1, topk 2, expert_choice 1."""
    _check_choice("default_k", "router", router, ROUTERS)
    return {"switch": 1, "topk": 2, "expert_choice": 1}[router]


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert per group: ``clip(ceil(capacity_factor · n_tokens · k / n_experts), 1, n_tokens)``.

    Computed in Python at trace time (static). The product is rounded to 9 decimals before the ceiling so
    that e.g. 1.1 · 10 / 11 gives 1, not 2, despite floating-point error.
    """
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"expert_capacity: `capacity_factor` must be a number > 0; got {capacity_factor!r}")
    for name, v in (("n_tokens", n_tokens), ("n_experts", n_experts), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expert_capacity: `{name}` must be a positive int; got {v!r}")
    raw = math.ceil(round(capacity_factor * n_tokens * k / n_experts, 9))
    return max(1, min(raw, n_tokens))


# ----------------------------------------------------------------------------------------------- router

def router_probs(logits):
    """softmax over experts in (at least) float32.  logits: (..., E) -> (..., E)."""
    logits = logits.astype(compute_dtype(logits))
    return jax.nn.softmax(logits, axis=-1)


def router_jitter(x, rng, eps: float):
    """Switch input jitter: ``x · u``, u ~ U[1 − eps, 1 + eps] elementwise (train only; the caller decides).

    x: any shape, float; rng: a PRNG key; eps in [0, 1). eps == 0 returns x unchanged.
    """
    if not 0 <= eps < 1:
        raise ValueError(f"router_jitter: `eps` must be in [0, 1); got {eps!r}")
    if eps == 0:
        return x
    noise = jax.random.uniform(rng, x.shape, compute_dtype(x), 1.0 - eps, 1.0 + eps)
    return (x.astype(noise.dtype) * noise).astype(x.dtype)


def _aux_loss_per_group(logits, token_mask=None):
    """(per-group Switch aux loss (g,), group has a real token (g,) float): see `load_balancing_loss`."""
    probs = router_probs(logits)
    n_experts = probs.shape[-1]
    top1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), n_experts, dtype=probs.dtype)  # (g, t, E)
    if token_mask is None:
        f = jnp.mean(top1, axis=1)                                                  # (g, E)
        p = jnp.mean(probs, axis=1)                                                 # (g, E)
        return n_experts * jnp.sum(f * p, axis=-1), jnp.ones(probs.shape[:1], probs.dtype)
    m = token_mask.astype(bool)[..., None]                                          # (g, t, 1)
    n = jnp.sum(m.astype(probs.dtype), axis=1)                                      # (g, 1)
    zero = jnp.zeros((), probs.dtype)                # select: a NaN logit at padding changes nothing
    f = jnp.sum(jnp.where(m, top1, zero), axis=1) / jnp.maximum(n, 1)
    p = jnp.sum(jnp.where(m, probs, zero), axis=1) / jnp.maximum(n, 1)
    return n_experts * jnp.sum(f * p, axis=-1), (n[:, 0] > 0).astype(probs.dtype)


def load_balancing_loss(logits, token_mask=None):
    """Switch aux loss, averaged over groups: ``mean_g E · Σ_e f_e · P_e``.

    logits: (g, t, E). f_e = fraction of the group's tokens whose top-1 expert is e (before any dropping;
    not differentiated), P_e = mean router probability of e. Equals 1 for a perfectly uniform router.
    token_mask: optional (g, t), 1 = real token, 0 = padding: f_e and P_e over the group's real tokens only;
    the mean runs over the groups holding at least one real token (0 when none does).
    """
    _check_logits("load_balancing_loss", logits)
    token_mask = _check_token_mask("load_balancing_loss", token_mask, *logits.shape[:2])
    per_group, has_tokens = _aux_loss_per_group(logits, token_mask)
    if token_mask is None:
        return jnp.mean(per_group)
    return jnp.sum(per_group * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1)


def router_z_loss(logits, token_mask=None):
    """Router z-loss (ST-MoE): mean over all tokens of ``logsumexp(logits)²``.  logits: (..., E) -> ().

    token_mask: optional, logits.shape[:-1], 1 = real token, 0 = padding: the mean over real tokens only.
    """
    logits = logits.astype(compute_dtype(logits))
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    if token_mask is None:
        return jnp.mean(z)
    check_array("router_z_loss", "token_mask", token_mask, z.shape, kind="any")
    m = token_mask.astype(bool)
    return jnp.sum(jnp.where(m, z, jnp.zeros((), z.dtype))) / jnp.maximum(jnp.sum(m.astype(z.dtype)), 1)


# ---------------------------------------------------------------------------------------------- routing

def prefix_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> np.ndarray:
    """The causal capacity schedule, (n_tokens,) int32: an expert may have kept at most
    ``cap[p] = max(1, ceil(capacity_factor · (p + 1) · k / E))`` assignments of a sequence's first p + 1
    tokens. Static (numpy, rounded to 9 decimals before the ceiling as `expert_capacity`); cap[t − 1] is the
    row capacity C, so the kept assignments always fit C slots."""
    p = np.arange(1, n_tokens + 1, dtype=np.float64)
    return np.maximum(np.ceil(np.round(capacity_factor * p * k / n_experts, 9)), 1).astype(np.int32)


def _segmented_cummin(values, starts):
    """Running minimum along axis 1 restarting where `starts` is True.  values: (g, t, E); starts: (g, t, 1)."""
    def combine(a, b):
        (va, sa), (vb, sb) = a, b
        return jnp.where(sb, vb, jnp.minimum(va, vb)), sa | sb
    return jax.lax.associative_scan(combine, (values, jnp.broadcast_to(starts, values.shape)), axis=1)[0]


def causal_slots(expert, valid, n_experts: int, capacity_factor: float, doc_start, doc_pos):
    """Which assignments an expert keeps under the causal capacity, and their buffer slots.

    expert: (g, t, k) int, distinct experts per token; valid: (g, t, k) bool (False: padding);
    doc_start: (g, t) bool, True at the first position of every document (always at 0; where `seq_idx`
    changes); doc_pos: (g, t) int, each token's position among its document's real tokens.
    Rule: in token order (a token's k choices are distinct experts), expert e keeps an assignment iff it
    has kept fewer than ``cap[p]`` (`prefix_capacity`) of the document's earlier assignments, p the token's
    position in its document. The kept count K follows K_p = min(K_{p-1} + d_p, cap[p]) (d_p: demand), whose
    closed form K_p = D_p + min(0, min_{q<=p} (cap[q] − D_q)) (D: cumulative demand) needs only a cumsum
    and a segmented running minimum — no sequential scan. A decision depends on the document's tokens up to
    and including this one, nothing else: causal, the same at any sequence length, with any left padding,
    and for a document packed with others. Slots count the row's kept assignments per expert; the row
    buffer C = cap[t − 1] holds them all for a single document per row, and for packed documents whose
    lengths are multiples of E / (capacity_factor · k) (otherwise a full buffer drops the later ones).
    Returns (kept (g, t, k) bool, slot (g, t, k) int32 — meaningful where kept).
    """
    g, t, k = expert.shape
    schedule = prefix_capacity(t, n_experts, k, capacity_factor)
    capacity, table = min(int(schedule[-1]), t), jnp.asarray(schedule)
    onehot = jax.nn.one_hot(expert, n_experts, dtype=jnp.int32)                     # (g, t, k, E)
    demand = jnp.sum(jnp.where(valid[..., None], onehot, 0), axis=2)               # (g, t, E) in {0, 1}
    cum = jnp.cumsum(demand, axis=1)
    idx = jnp.arange(t, dtype=jnp.int32)
    start_idx = jax.lax.cummax(jnp.where(doc_start, idx, 0), axis=1)                # (g, t)
    before_doc = jnp.take_along_axis(cum - demand, start_idx[..., None], axis=1)   # demand before the document
    cum_doc = cum - before_doc
    cap = table[jnp.clip(doc_pos, 0, t - 1)][..., None]                             # (g, t, 1)
    kept_count = cum_doc + jnp.minimum(_segmented_cummin(cap - cum_doc, doc_start[..., None]), 0)
    previous = jnp.concatenate([jnp.zeros_like(kept_count[:, :1]), kept_count[:, :-1]], axis=1)
    previous = jnp.where(doc_start[..., None], 0, previous)
    kept_te = (demand > 0) & (kept_count > previous)                                # (g, t, E)
    slot_te = jnp.cumsum(kept_te.astype(jnp.int32), axis=1) - 1
    kept_te = kept_te & (slot_te < capacity)
    kept = jnp.take_along_axis(kept_te, expert, axis=2) & valid
    slot = jnp.take_along_axis(slot_te, expert, axis=2)
    return kept, slot.astype(jnp.int32)


def _documents(token_mask, seq_idx, g: int, t: int):
    """(doc_start (g, t) bool, doc_pos (g, t) int32) of rows with optional padding and packed documents."""
    idx = jnp.arange(t, dtype=jnp.int32)
    if seq_idx is None:
        doc_start = jnp.broadcast_to(idx == 0, (g, t))
    else:
        doc_start = segment_starts(seq_idx)
    return doc_start, token_positions(token_mask, seq_idx, None, g, t)


def to_routing_groups(a, rows: int):
    """Rows of a batch into routing groups of `rows` rows each, position-major: (b, l, ...) ->
    (b / rows, l · rows, ...), group i holding rows i·rows .. (i + 1)·rows − 1 ordered as (position 0 of each
    row, position 1 of each row, ...). Under the causal capacity a token's fate then depends on earlier
    positions of every row in its group and on the same position of the rows before it, never on any row's
    later positions (MoE-Mamba's batch-level capacity without a leak from a row's future)."""
    b, l = a.shape[:2]
    if b % rows:
        raise ValueError(f"to_routing_groups: the batch ({b} rows) must be divisible by `rows`={rows}")
    grouped = a.reshape(b // rows, rows, l, *a.shape[2:])
    return jnp.swapaxes(grouped, 1, 2).reshape(b // rows, l * rows, *a.shape[2:])


def from_routing_groups(a, rows: int):
    """The inverse of `to_routing_groups`: (b / rows, l · rows, ...) -> (b, l, ...)."""
    g, n = a.shape[:2]
    grouped = a.reshape(g, n // rows, rows, *a.shape[2:])
    return jnp.swapaxes(grouped, 1, 2).reshape(g * rows, n // rows, *a.shape[2:])


def route_token_choice(logits, k: int, capacity_factor: float, *, token_mask=None, seq_idx=None) -> Routing:
    """Switch (k = 1) / top-k token-choice routing with the causal capacity (`causal_slots`).

    logits: (g, t, E); k: experts per token (<= E); capacity_factor: > 0, the row buffer holds
    C = `expert_capacity`(t, E, k, capacity_factor) slots per expert and an expert keeps at most
    ceil(capacity_factor · (p + 1) · k / E) assignments of a document's first p + 1 tokens;
    token_mask: optional (g, t), 1 = real token, 0 = padding (padding takes no slot and is never kept);
    seq_idx: optional (g, t) int, packed documents (the capacity schedule restarts at each).
    Returns a `Routing` with (g, t, k) arrays (position: the slot, C when dropped). Gates: k = 1 raw
    probability; k > 1 renormalised over the k chosen experts (before dropping).
    """
    fn = "route_token_choice"
    _check_logits(fn, logits)
    g, t, n_experts = logits.shape
    _check_k(fn, k, n_experts)
    capacity = expert_capacity(t, n_experts, k, capacity_factor)
    token_mask = _check_token_mask(fn, token_mask, g, t)
    if seq_idx is not None:
        check_array(fn, "seq_idx", seq_idx, (g, t), kind="int")
    probs = router_probs(logits)
    top_p, top_e = jax.lax.top_k(probs, k)                      # (g, t, k), descending
    gate = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if k > 1 else top_p
    valid = jnp.ones(top_e.shape, bool) if token_mask is None else jnp.broadcast_to(token_mask[..., None], top_e.shape)
    doc_start, doc_pos = _documents(token_mask, seq_idx, g, t)
    kept, slot = causal_slots(top_e, valid, n_experts, capacity_factor, doc_start, doc_pos)
    return Routing(top_e.astype(jnp.int32), jnp.where(kept, slot, capacity).astype(jnp.int32),
                   jnp.where(kept, gate, 0), kept)


def route_expert_choice(logits, capacity: int, *, token_mask=None) -> Routing:
    """Expert-choice routing: each expert takes its top-C tokens of the group by router probability.

    logits: (g, t, E); capacity: C (<= t); token_mask: optional (g, t), 1 = real token, 0 = padding (never
    chosen: an expert takes its top-C real tokens, fewer when the group has fewer than C).
    Returns a `Routing` with (g, t, E) arrays: assignment j of a token is expert j, kept when expert j chose
    the token, at the slot given by the token's rank.
    """
    fn = "route_expert_choice"
    _check_logits(fn, logits)
    g, t, n_experts = logits.shape
    if not 1 <= capacity <= t:
        raise ValueError(f"{fn}: `capacity` must be in [1, t={t}]; got {capacity}")
    token_mask = _check_token_mask(fn, token_mask, g, t)
    probs = router_probs(logits)
    # padding ranks below every real token (probabilities are >= 0)
    score = probs if token_mask is None else jnp.where(token_mask[..., None], probs, -1.0)

    def one_group(p):                                           # p: (t, E)
        _, tok = jax.lax.top_k(p.T, capacity)                   # (E, C) token of each slot
        pos = jnp.full((n_experts, t), capacity, jnp.int32)
        pos = pos.at[jnp.arange(n_experts)[:, None], tok].set(jnp.arange(capacity, dtype=jnp.int32)[None, :])
        return pos.T                                            # (t, E)

    pos = jax.vmap(one_group)(score)
    kept = pos < capacity
    if token_mask is not None:
        kept = kept & token_mask[..., None]
        pos = jnp.where(kept, pos, capacity)
    expert = jnp.broadcast_to(jnp.arange(n_experts, dtype=jnp.int32), (g, t, n_experts))
    return Routing(expert, pos, jnp.where(kept, probs, 0), kept)


def route(logits, *, router: str, k: int, capacity_factor: float, token_mask=None, seq_idx=None) -> Routing:
    """Dispatch to `route_token_choice` (switch: k must be 1; topk) or `route_expert_choice` (capacity
    C = `expert_capacity`(t, E, k, capacity_factor); k only scales it). token_mask: optional (g, t), 1 = real
    token, 0 = padding (kept out of routing); seq_idx: optional (g, t) packed documents (token choice)."""
    _check_choice("route", "router", router, ROUTERS)
    if router == "expert_choice":
        g, t, n_experts = logits.shape
        return route_expert_choice(logits, expert_capacity(t, n_experts, k, capacity_factor), token_mask=token_mask)
    if router == "switch" and k != 1:
        raise ValueError(f"route: the switch router routes each token to k=1 expert; got `k`={k!r} "
                         "(use router='topk')")
    return route_token_choice(logits, k, capacity_factor, token_mask=token_mask, seq_idx=seq_idx)


# --------------------------------------------------------------------------------------------- dispatch

def dense_dispatch_tensors(routing: Routing, n_experts: int, capacity: int):
    """GShard dispatch and combine tensors, both (g, t, E, C): dispatch is 0/1, combine carries the gates."""
    e_oh = jax.nn.one_hot(routing.expert, n_experts, dtype=routing.gate.dtype)      # (g, t, k, E)
    c_oh = jax.nn.one_hot(routing.position, capacity, dtype=routing.gate.dtype)     # position C -> zeros
    dispatch = jnp.einsum("gtke,gtkc->gtec", e_oh, c_oh)
    combine = jnp.einsum("gtk,gtke,gtkc->gtec", routing.gate, e_oh, c_oh)
    return dispatch, combine


def slot_indices(routing: Routing, n_experts: int, capacity: int):
    """Index arrays of the sort-based path (no tokens × experts × capacity tensor).

    Returns (flat_slot, slot_token):
      flat_slot: (g, t, k) int32, ``expert · C + position`` of each kept assignment, ``E · C`` if dropped;
      slot_token: (g, E · C) int32, the token in each expert slot, ``t`` for an empty slot.
    """
    g, t, k = routing.expert.shape
    n_slots = n_experts * capacity
    flat_slot = jnp.where(routing.kept, routing.expert * capacity + routing.position, n_slots).astype(jnp.int32)
    tokens = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(-1)

    def one_group(fs):  # kept slots are distinct; dropped ones (index n_slots) fall off the end
        return jnp.full((n_slots,), t, jnp.int32).at[fs.reshape(-1)].set(tokens, mode="drop")

    return flat_slot, jax.vmap(one_group)(flat_slot)


def dispatch_dense(x, dispatch):
    """x: (g, t, d), dispatch: (g, t, E, C) -> expert inputs (g, E, C, d)."""
    return jnp.einsum("gtec,gtd->gecd", dispatch.astype(x.dtype), x)


def combine_dense(expert_out, combine):
    """expert_out: (g, E, C, d), combine: (g, t, E, C) -> (g, t, d) in combine's dtype."""
    return jnp.einsum("gtec,gecd->gtd", combine, expert_out.astype(combine.dtype))


def dispatch_sorted(x, slot_token):
    """x: (g, t, d), slot_token: (g, E·C) -> expert inputs (g, E·C, d); empty slots (index t) are zero."""
    return jax.vmap(lambda xg, st: jnp.take(xg, st, axis=0, mode="fill", fill_value=0))(x, slot_token)


def combine_sorted(expert_out, flat_slot, gate):
    """expert_out: (g, E·C, d), flat_slot: (g, t, k), gate: (g, t, k) -> (g, t, d) in gate's dtype.

    Each token sums ``gate_j · expert_out[flat_slot_j]``; dropped assignments (index E·C) read zero.
    """
    def one_group(yg, fs, gt):
        picked = jnp.take(yg.astype(gt.dtype), fs, axis=0, mode="fill", fill_value=0)  # (t, k, d)
        return jnp.einsum("tk,tkd->td", gt, picked)

    return jax.vmap(one_group)(expert_out, flat_slot, gate)


# ------------------------------------------------------------------------------------------------ experts

def expert_ffn(xe, w_in, w_out, b_in=None, b_out=None, activation: str = "relu"):
    """Per-expert two-layer FFN: ``act(xe @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``.

    xe: (g, E, C, d); w_in: (E, d, f); w_out: (E, f, d_out); b_in: (E, f); b_out: (E, d_out)
    -> (g, E, C, d_out).
    """
    _check_choice("expert_ffn", "activation", activation, tuple(ACTIVATIONS))
    h = jnp.einsum("gecd,edf->gecf", xe, w_in)
    if b_in is not None:
        h = h + b_in[None, :, None, :]
    h = ACTIVATIONS[activation](h)
    y = jnp.einsum("gecf,efo->geco", h, w_out)
    if b_out is not None:
        y = y + b_out[None, :, None, :]
    return y


# ----------------------------------------------------------------------------------------------- metrics

def routing_metric_sums(logits, routing: Routing, capacity: int, router: str, token_mask=None
                        ) -> Dict[str, tuple]:
    """The metrics of `routing_metrics` as ``name -> (numerator, denominator)`` sums over this batch's
    groups, so that shards holding different groups can add them up (``psum``) before dividing
    (`finish_routing_metrics`): exact means over all groups / real tokens whatever the sharding.

    logits: (g, t, E); routing: (g, t, k) arrays; token_mask: optional (g, t), 1 = real, 0 = padding.
    Numerators are scalars except expert_load's (E,); denominators are scalars.
    """
    g, t, n_experts = logits.shape
    kept = routing.kept
    real = jnp.ones((g, t), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    n_real = jnp.sum(real)
    k = kept.shape[-1]
    unrouted = jnp.sum(jnp.logical_not(jnp.any(kept, axis=-1)).astype(jnp.float32) * real)
    if router == "expert_choice":
        dropped = (unrouted, n_real)
    else:
        dropped = (jnp.sum(jnp.logical_not(kept).astype(jnp.float32) * real[..., None]), n_real * k)
    per_expert = jnp.zeros((g, n_experts), jnp.float32)
    per_expert = jax.vmap(lambda z, e, m: z.at[e.reshape(-1)].add(m.reshape(-1).astype(jnp.float32)))(
        per_expert, routing.expert, kept)
    aux, has_tokens = _aux_loss_per_group(logits, None if token_mask is None else token_mask.astype(bool))
    z = jax.nn.logsumexp(logits.astype(compute_dtype(logits)), axis=-1) ** 2          # (g, t)
    return {"aux_loss": (jnp.sum(aux * has_tokens), jnp.sum(has_tokens)),
            "z_loss": (jnp.sum(jnp.where(real > 0, z, jnp.zeros((), z.dtype))), n_real.astype(z.dtype)),
            "dropped_fraction": dropped,
            "unrouted_fraction": (unrouted, n_real),
            "expert_load": (jnp.sum(per_expert, axis=0) / capacity, jnp.asarray(g, jnp.float32))}


def finish_routing_metrics(sums: Dict[str, tuple]) -> Dict[str, jax.Array]:
    """``numerator / max(denominator, 1)`` of each entry of `routing_metric_sums` (0 for an empty batch)."""
    return {name: num / jnp.maximum(den, 1).astype(jnp.result_type(num)) for name, (num, den) in sums.items()}


def routing_metrics(logits, routing: Routing, capacity: int, router: str, token_mask=None) -> Dict[str, jax.Array]:
    """Scalars and per-expert loads of one routing.

    aux_loss: `load_balancing_loss`; z_loss: `router_z_loss`;
    dropped_fraction: token choice — fraction of the t·k assignments dropped; expert choice — fraction of
      tokens no expert took (assignments are not requests there);
    unrouted_fraction: fraction of tokens with no kept assignment (their layer output is zero);
    expert_load: (E,), kept assignments of each expert / C (fraction of its slots used), mean over groups.
    token_mask: optional (g, t), 1 = real token, 0 = padding: every fraction and loss over real tokens only
    (padding is never kept, so it uses no load either).
    """
    return finish_routing_metrics(routing_metric_sums(logits, routing, capacity, router, token_mask))


# ------------------------------------------------------------------------------------------------- layer

def mixture_of_experts(x, logits, expert_fn: Callable, *, router: str = "switch", k: int | None = None,
        capacity_factor: float = 1.0, dispatch: str = "dense", token_mask=None, seq_idx=None,
        metric_sums: bool = False):
    """Route, dispatch, run the experts, combine.

    x: (g, t, d) tokens in groups; logits: (g, t, E) router logits (computed in float32 or wider by the
    caller; cast here to at least float32); expert_fn: (g, E, C, d) -> (g, E, C, d_out);
    router: "switch" | "topk" | "expert_choice"; k: assignments per token (None: `default_k(router)`;
    for expert choice it only enters the capacity, as the mean number of experts per token);
    capacity_factor: > 0, see `expert_capacity` (for no capacity, see `mixture_of_experts_dropless`);
    dispatch: "dense" | "sorted" (equal results);
    token_mask: optional (g, t), 1 = real token, 0 = padding — padding takes no expert slot, gets y = 0 and
    counts in no metric (see the module docstring); seq_idx: optional (g, t) int, packed documents (the
    causal capacity restarts at each); metric_sums: return `routing_metric_sums` instead
    of the finished metrics (for callers that add them up over shards).

    Returns (y, metrics): y (g, t, d_out) in x's dtype, zero for unrouted and padding tokens; metrics as
    `routing_metrics`.
    """
    fn = "mixture_of_experts"
    check_array(fn, "x", x, ("g", "t", "d"))
    check_array(fn, "logits", logits, (x.shape[0], x.shape[1], "E"))
    _check_choice(fn, "router", router, ROUTERS)
    _check_choice(fn, "dispatch", dispatch, DISPATCHES)
    g, t, _ = x.shape
    n_experts = logits.shape[-1]
    k = default_k(router) if k is None else k
    _check_k(fn, k, n_experts)
    token_mask = _check_token_mask(fn, token_mask, g, t)
    capacity = expert_capacity(t, n_experts, k, capacity_factor)
    logits = logits.astype(compute_dtype(logits, x))
    if token_mask is not None:   # select, never multiply: a NaN at a padding position must not spread
        x = jnp.where(token_mask[..., None], x, jnp.zeros((), x.dtype))
        logits = jnp.where(token_mask[..., None], logits, jnp.zeros((), logits.dtype))
    routing = route(logits, router=router, k=k, capacity_factor=capacity_factor, token_mask=token_mask,
                    seq_idx=seq_idx)
    if dispatch == "dense":
        disp, comb = dense_dispatch_tensors(routing, n_experts, capacity)
        ye = expert_fn(dispatch_dense(x, disp))                             # (g, E, C, d_out)
        y = combine_dense(ye, comb)
    else:
        flat_slot, slot_token = slot_indices(routing, n_experts, capacity)
        xe = dispatch_sorted(x, slot_token).reshape(g, n_experts, capacity, x.shape[-1])
        ye = expert_fn(xe)
        y = combine_sorted(ye.reshape(g, n_experts * capacity, ye.shape[-1]), flat_slot, routing.gate)
    sums = routing_metric_sums(logits, routing, capacity, router, token_mask)
    return y.astype(x.dtype), sums if metric_sums else finish_routing_metrics(sums)


# ---------------------------------------------------------------------------------------------- dropless

def route_dropless(logits, k: int, *, token_mask=None) -> Routing:
    """Token-choice routing with no capacity: every real token keeps its k most probable experts.

    logits: (g, t, E); token_mask: optional (g, t), 1 = real, 0 = padding (padding is never kept).
    Returns a `Routing` of (g, t, k) arrays (position 0 everywhere: there are no slots). Gates as
    `route_token_choice`: k = 1 the raw probability, k > 1 renormalised over the chosen experts.
    """
    fn = "route_dropless"
    _check_logits(fn, logits)
    _check_k(fn, k, logits.shape[-1])
    token_mask = _check_token_mask(fn, token_mask, *logits.shape[:2])
    top_p, top_e = jax.lax.top_k(router_probs(logits), k)
    gate = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if k > 1 else top_p
    kept = jnp.ones(top_e.shape, bool) if token_mask is None else jnp.broadcast_to(token_mask[..., None], top_e.shape)
    return Routing(top_e.astype(jnp.int32), jnp.zeros(top_e.shape, jnp.int32), jnp.where(kept, gate, 0), kept)


def grouped_expert_ffn(x, expert, w_in, w_out, b_in=None, b_out=None, activation: str = "relu",
                       first_expert=0):
    """Each row through its own expert's FFN, as one grouped matmul (`jax.lax.ragged_dot`).

    x: (m, d) rows (assignments); expert: (m,) int, the expert of each row; w_in: (E_l, d, f), w_out:
    (E_l, f, d_out), b_in: (E_l, f), b_out: (E_l, d_out) — the weights of experts first_expert ...
    first_expert + E_l − 1 (all experts when first_expert = 0 and E_l = E; a slice of them on an
    expert-parallel device). Rows whose expert is not among these get zero output.
    Returns (m, d_out): ``act(x_i @ w_in[e_i] + b_in[e_i]) @ w_out[e_i] + b_out[e_i]``. Work O(m·d·f).
    """
    _check_choice("grouped_expert_ffn", "activation", activation, tuple(ACTIVATIONS))
    n_local = w_in.shape[0]
    local_e = expert.astype(jnp.int32) - first_expert
    is_local = (local_e >= 0) & (local_e < n_local)
    bucket = jnp.where(is_local, local_e, n_local)              # other experts' rows sort to the end
    order = jnp.argsort(bucket, stable=True)
    sizes = jnp.zeros((n_local + 1,), jnp.int32).at[bucket].add(1)[:n_local]
    xs, es, ls = x[order], jnp.minimum(bucket[order], n_local - 1), is_local[order][:, None]
    h = jax.lax.ragged_dot(xs, w_in, sizes)                     # rows past sum(sizes) come out zero
    if b_in is not None:
        h = h + jnp.where(ls, b_in[es], jnp.zeros((), h.dtype))
    h = ACTIVATIONS[activation](h)
    y = jax.lax.ragged_dot(h, w_out, sizes)
    if b_out is not None:
        y = y + b_out[es]
    y = jnp.where(ls, y, jnp.zeros((), y.dtype))
    return jnp.zeros_like(y).at[order].set(y)


def mixture_of_experts_dropless(x, logits, w_in, w_out, b_in=None, b_out=None, *, router: str = "switch",
                                k: int | None = None, activation: str = "relu", expert_dtype=None,
                                token_mask=None, metric_sums: bool = False, first_expert=0):
    """Dropless MoE: every real token through its k experts, ``y_t = Σ_j gate_j · FFN_{e_j}(x_t)``.

    Token-wise: a token's output depends on its own input only (no capacity, no competition), so a causal
    model's decoding equals its forward. x: (g, t, d); logits: (g, t, E); weights as `grouped_expert_ffn`
    (a slice of the experts starting at `first_expert` on an expert-parallel device: the other experts'
    contributions are then zero, to be summed over devices); router: "switch" or "topk" (expert choice has
    no dropless form); expert_dtype: of the expert matmuls (default x's); token_mask: optional (g, t),
    1 = real, 0 = padding (y = 0, counted in no metric). Returns (y (g, t, d_out) in x's dtype, metrics as
    `routing_metrics`, with dropped_fraction 0 and expert_load relative to a uniform share ceil(t·k/E)).
    """
    fn = "mixture_of_experts_dropless"
    check_array(fn, "x", x, ("g", "t", "d"))
    check_array(fn, "logits", logits, (x.shape[0], x.shape[1], "E"))
    _check_choice(fn, "router", router, ROUTERS)
    if router == "expert_choice":
        raise ValueError(f"{fn}: expert-choice routing has no dropless form (each expert takes its top-C "
                         "tokens); give it a capacity factor")
    g, t, d = x.shape
    n_experts = logits.shape[-1]
    k = default_k(router) if k is None else k
    _check_k(fn, k, n_experts)
    token_mask = _check_token_mask(fn, token_mask, g, t)
    logits = logits.astype(compute_dtype(logits, x))
    if token_mask is not None:   # select: a NaN logit at padding reaches neither the routing nor its gradient
        logits = jnp.where(token_mask[..., None], logits, jnp.zeros((), logits.dtype))
    routing = route_dropless(logits, k, token_mask=token_mask)
    cdt = x.dtype if expert_dtype is None else jnp.dtype(expert_dtype)
    xc = x.astype(cdt)
    if token_mask is not None:
        xc = jnp.where(token_mask[..., None], xc, jnp.zeros((), cdt))
    rows = jnp.repeat(xc.reshape(g * t, d), k, axis=0)                      # (g·t·k, d), token-major
    cast = lambda a: None if a is None else a.astype(cdt)  # noqa: E731
    ye = grouped_expert_ffn(rows, routing.expert.reshape(-1), cast(w_in), cast(w_out), cast(b_in), cast(b_out),
                            activation, first_expert)
    ye = ye.reshape(g, t, k, -1).astype(routing.gate.dtype)
    y = jnp.einsum("gtk,gtkd->gtd", routing.gate, jnp.where(routing.kept[..., None], ye, 0))
    sums = routing_metric_sums(logits, routing, expert_capacity(t, n_experts, k, 1.0), router, token_mask)
    return y.astype(x.dtype), sums if metric_sums else finish_routing_metrics(sums)
