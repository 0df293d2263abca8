"""Knowledge-distillation losses: pure functions of logits and hidden states.

Conventions (every function here):

- P is the **teacher** distribution, Q the **student** distribution, both ``softmax(logits / T)`` over the
  last axis. ``forward_kl = KL(P || Q)`` (mode-covering; MambaInLlama stage 1), ``reverse_kl = KL(Q || P)``
  (mode-seeking; M1 stage 2), ``jsd`` the generalised Jensen–Shannon divergence with weight β on P.
- Logits have shape ``(..., V)`` (typically (b, l, V)); a per-token loss has shape ``(...)`` and the
  result is its mean over the unmasked tokens: ``mask`` has shape ``logits.shape[:-1]`` (bool, or numbers
  where nonzero means "keep"); ``None`` keeps every token; with every token masked the result is 0 (not
  NaN) and every gradient is 0. Masked tokens never change the value and get exactly zero gradient.
- Computation is in float32 for float32/bf16/fp16 inputs (float64 inputs stay float64), with
  ``jax.nn.log_softmax`` so that logits of ±1e4 neither overflow nor produce NaN. The result is a scalar
  of that dtype.
- ``scale_by_temperature_squared=True`` multiplies the loss by T² (Hinton et al.), which keeps the
  gradient magnitude of the soft term independent of T when it is mixed with a hard-label loss.
- Gradients flow into both arguments; stop them on the teacher (``jax.lax.stop_gradient``) in a training
  step if the teacher is not being trained (the train step does this by taking no teacher gradients).
- Shapes are checked at trace time (free under jit); mismatches raise ValueError naming the argument and
  the expected shape.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import compute_dtype, fmt_shape
from mamba_jax.train.step import masked_cross_entropy, masked_mean

Array = jax.Array

KL_KINDS = ("forward_kl", "reverse_kl", "jsd")


# --------------------------------------------------------------------------------------------- checks


def _expect_shape(fn: str, name: str, x, expected: Sequence[object], why: str = "") -> None:
    """ValueError unless `x` has shape `expected` (ints checked; None = any size), via `chex.assert_shape`."""
    shape = getattr(x, "shape", None)
    shown = fmt_shape("?" if e is None else e for e in expected)
    if shape is None:
        raise ValueError(f"{fn}: `{name}` must be an array of shape {shown}; got {type(x).__name__}")
    try:
        chex.assert_shape(x, tuple(expected))
    except AssertionError:
        raise ValueError(f"{fn}: `{name}` must have shape {shown}{why}; got {fmt_shape(shape)}") from None


def _expect_float(fn: str, name: str, x) -> None:
    if getattr(x, "shape", None) is None or getattr(x, "ndim", 0) < 1:
        raise ValueError(f"{fn}: `{name}` must be an array of shape (..., V) with at least one axis; "
                         f"got {type(x).__name__} of shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating):
        raise ValueError(f"{fn}: `{name}` must be a floating-point array; got dtype {jnp.dtype(x.dtype)}")


def _expect_int(fn: str, name: str, x) -> None:
    if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.integer):
        raise ValueError(f"{fn}: `{name}` must be an integer array (e.g. int32); got dtype {jnp.dtype(x.dtype)}")


def _check_temperature(fn: str, temperature) -> None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"{fn}: `temperature` must be > 0; got {temperature!r}")


def _check_mask(fn: str, mask, token_shape: Tuple[int, ...]) -> None:
    if mask is not None:
        _expect_shape(fn, "mask", mask, token_shape, " (= logits.shape[:-1])")


def _check_pair(fn: str, student_logits, teacher_logits, temperature, mask) -> None:
    """Both logits (..., V) with equal shapes (same vocabulary), mask (...)."""
    _expect_float(fn, "student_logits", student_logits)
    _expect_float(fn, "teacher_logits", teacher_logits)
    s, t = student_logits.shape, teacher_logits.shape
    if s[-1] != t[-1]:
        raise ValueError(f"{fn}: vocabularies differ: `student_logits` has V={s[-1]}, `teacher_logits` has "
                         f"V={t[-1]}; `teacher_logits` must have shape {fmt_shape(s)}; got {fmt_shape(t)}")
    _expect_shape(fn, "teacher_logits", teacher_logits, s, " (the shape of `student_logits`)")
    _check_temperature(fn, temperature)
    _check_mask(fn, mask, s[:-1])


# ------------------------------------------------------------------------------------------ building blocks


def _log_probs(logits: Array, temperature, dtype) -> Array:
    """log softmax(logits / T) over the last axis, in `dtype`. (..., V) -> (..., V)."""
    return jax.nn.log_softmax(logits.astype(dtype) / jnp.asarray(temperature, dtype), axis=-1)


def kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
    """Per-token KL(P || Q) = Σ_v p_v (log p_v − log q_v) from log-probabilities (..., V) -> (...).

    Entries with p_v = 0 (log p_v = −inf, e.g. a teacher's −inf padding logits) contribute exactly 0, with
    finite gradients (the "double where": log p is replaced by 0 before it meets the multiplication).
    """
    p = jnp.exp(log_p)
    safe_log_p = jnp.where(p > 0, log_p, 0.0)
    return jnp.sum(jnp.where(p > 0, p * (safe_log_p - log_q), 0.0), axis=-1)


def _finish(per_token: Array, mask, temperature, scale_by_temperature_squared: bool) -> Array:
    loss = masked_mean(per_token, mask)
    if scale_by_temperature_squared:
        loss = loss * jnp.asarray(temperature, loss.dtype) ** 2
    return loss


# ------------------------------------------------------------------------------------------ logit losses


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0, mask: Optional[Array] = None,
               scale_by_temperature_squared: bool = False) -> Array:
    """Forward KL, KL(P_teacher || Q_student), averaged over unmasked tokens.

    Args:
      student_logits, teacher_logits: (..., V) float, same shape (e.g. (b, l, V)).
      temperature: T > 0; both distributions are softmax(logits / T).
      mask: (...) = logits.shape[:-1], nonzero = keep; None keeps all.
      scale_by_temperature_squared: multiply the result by T².
    Returns a scalar (float32, or float64 for float64 inputs). Its gradient w.r.t. the student logits is,
    per token, (softmax(s/T) − softmax(t/T)) / T divided by the number of unmasked tokens (× T² if scaled).
    """
    _check_pair("forward_kl", student_logits, teacher_logits, temperature, mask)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature, dtype)
    log_p = _log_probs(teacher_logits, temperature, dtype)
    return _finish(kl_from_log_probs(log_p, log_q), mask, temperature, scale_by_temperature_squared)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0, mask: Optional[Array] = None,
               scale_by_temperature_squared: bool = False) -> Array:
    """Reverse KL, KL(Q_student || P_teacher), averaged over unmasked tokens.

    Args and result as `forward_kl`: logits (..., V) of equal shapes, mask (...), scalar result.
    """
    _check_pair("reverse_kl", student_logits, teacher_logits, temperature, mask)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature, dtype)
    log_p = _log_probs(teacher_logits, temperature, dtype)
    return _finish(kl_from_log_probs(log_q, log_p), mask, temperature, scale_by_temperature_squared)


def jsd(student_logits: Array, teacher_logits: Array, *, beta=0.5, temperature=1.0, mask: Optional[Array] = None,
        scale_by_temperature_squared: bool = False) -> Array:
    """Generalised Jensen–Shannon divergence, averaged over unmasked tokens.

    JSD_β(P || Q) = β·KL(P || M) + (1 − β)·KL(Q || M),  M = β·P + (1 − β)·Q,
    with P the teacher and Q the student (the GKD / TRL `generalized_jsd_loss` convention).

    - β = 0.5 gives the symmetric JSD, bounded by log 2.
    - β ∈ {0, 1}: M equals Q (resp. P) and the divergence is exactly 0, with zero, finite gradients
      (no log 0 is taken: M is formed in log space with `logsumexp` weights). Near the ends,
      JSD_β ≈ β·KL(P || Q) as β → 0 and ≈ (1 − β)·KL(Q || P) as β → 1, so JSD_β / β and JSD_β / (1 − β)
      interpolate towards `forward_kl` and `reverse_kl`; use those functions for the end points themselves.

    Args: as `forward_kl`, plus `beta` in [0, 1] (a Python float is checked; a traced one is not).
    Returns a scalar.
    """
    _check_pair("jsd", student_logits, teacher_logits, temperature, mask)
    if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: `beta` must be in [0, 1]; got {beta!r}")
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature, dtype)
    log_p = _log_probs(teacher_logits, temperature, dtype)
    beta = jnp.asarray(beta, dtype)
    weights = jnp.stack([beta, 1.0 - beta]).reshape((2,) + (1,) * log_p.ndim)
    log_m = jax.nn.logsumexp(jnp.stack([log_p, log_q]), axis=0, b=weights)
    per_token = beta * kl_from_log_probs(log_p, log_m) + (1.0 - beta) * kl_from_log_probs(log_q, log_m)
    return _finish(per_token, mask, temperature, scale_by_temperature_squared)


def forward_kl_topk(student_logits: Array, teacher_topk_logits: Array, teacher_topk_indices: Array, *,
                    temperature=1.0, mask: Optional[Array] = None,
                    scale_by_temperature_squared: bool = False) -> Array:
    """Forward KL against a teacher stored as its top-k logits only (e.g. read from disk).

    Convention: the teacher distribution is renormalised over its k stored entries,
    p̂_j = softmax(teacher_topk_logits / T)_j, and is 0 elsewhere; the student keeps its full-vocabulary
    distribution q = softmax(student_logits / T). The loss is KL(p̂ || q) = Σ_j p̂_j (log p̂_j − log q_{i_j}),
    so with k = V (any order of indices) it equals `forward_kl`, and its gradient w.r.t. the student logits
    is (q − p̂ scattered to the vocabulary) / T per token. Stored entries with logit −inf (padding) count
    as p̂ = 0.

    Args:
      student_logits: (..., V) float.
      teacher_topk_logits: (..., k) float, k ≤ V: the teacher's raw (not log-softmaxed) logits at
        `teacher_topk_indices`; any shift per token cancels in the renormalisation.
      teacher_topk_indices: (..., k) int, distinct vocabulary ids in [0, V) per token (values are not
        checked; an out-of-range id gathers NaN and makes the loss NaN).
      temperature, mask, scale_by_temperature_squared: as `forward_kl`.
    Returns a scalar.
    """
    fn = "forward_kl_topk"
    _expect_float(fn, "student_logits", student_logits)
    _expect_float(fn, "teacher_topk_logits", teacher_topk_logits)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    k = teacher_topk_logits.shape[-1]
    _expect_shape(fn, "teacher_topk_logits", teacher_topk_logits, lead + (None,),
                  " (the leading shape of `student_logits`, then k)")
    if k > v:
        raise ValueError(f"{fn}: `teacher_topk_logits` has k={k} entries per token, more than the student's "
                         f"vocabulary V={v}; expected shape {fmt_shape(lead + ('k',))} with k <= {v}")
    _expect_shape(fn, "teacher_topk_indices", teacher_topk_indices, teacher_topk_logits.shape,
                  " (the shape of `teacher_topk_logits`)")
    _expect_int(fn, "teacher_topk_indices", teacher_topk_indices)
    _check_temperature(fn, temperature)
    _check_mask(fn, mask, lead)
    dtype = compute_dtype(student_logits, teacher_topk_logits)
    log_q = _log_probs(student_logits, temperature, dtype)
    log_q_at_topk = jnp.take_along_axis(log_q, teacher_topk_indices.astype(jnp.int32), axis=-1, mode="fill")
    log_p = _log_probs(teacher_topk_logits, temperature, dtype)
    return _finish(kl_from_log_probs(log_p, log_q_at_topk), mask, temperature, scale_by_temperature_squared)


def kd_loss(student_logits: Array, labels: Array, *, teacher_logits: Optional[Array] = None,
            teacher_topk: Optional[Tuple[Array, Array]] = None, kind: str = "forward_kl", w_kl: float = 1.0,
            w_ce: float = 1.0, temperature=1.0, beta=0.5, mask: Optional[Array] = None,
            scale_by_temperature_squared: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """Distillation mixed with hard labels: ``w_kl · D(teacher, student) + w_ce · CE(student, labels)``.

    D is `forward_kl`, `reverse_kl` or `jsd` (``kind``; with temperature T, optional T² scaling and, for
    jsd, ``beta``) on full teacher logits, or `forward_kl_topk` when ``teacher_topk=(logits, indices)`` is
    given instead (only ``kind="forward_kl"`` is defined for a top-k teacher). CE is the cross-entropy of
    the *unscaled* student logits (temperature 1) against integer labels:
    `mamba_jax.train.step.masked_cross_entropy`. Both terms average over the same unmasked tokens.
    (MambaInLlama stage 1, as issue 9 reads it: forward KL, w_kl=0.1, w_ce=1.0; PKD: w_ce=α, w_kl=1−α.)

    Args:
      student_logits: (..., V) float; labels: (...) int, ids in [0, V).
      teacher_logits: (..., V) float, or None when `teacher_topk` ((..., k) float, (..., k) int) is given.
      mask: (...) nonzero = keep; None keeps all.
    Returns ``(loss, metrics)``: loss a scalar; metrics ``loss``, ``kl`` (the divergence term before
    weighting), ``ce`` and ``accuracy`` (argmax vs labels on unmasked tokens).
    """
    fn = "kd_loss"
    if kind not in KL_KINDS:
        raise ValueError(f"{fn}: `kind` must be one of {KL_KINDS}; got {kind!r}")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError(f"{fn}: give exactly one of `teacher_logits` (..., V) and `teacher_topk` "
                         f"((..., k) logits, (..., k) indices)")
    _expect_float(fn, "student_logits", student_logits)
    _expect_shape(fn, "labels", labels, student_logits.shape[:-1], " (= student_logits.shape[:-1])")
    _expect_int(fn, "labels", labels)
    opts = dict(temperature=temperature, mask=mask, scale_by_temperature_squared=scale_by_temperature_squared)
    if teacher_topk is not None:
        if kind != "forward_kl":
            raise ValueError(f"{fn}: a top-k teacher supports only kind='forward_kl'; got {kind!r}")
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise ValueError(f"{fn}: `teacher_topk` must be a pair (logits (..., k), indices (..., k))")
        kl = forward_kl_topk(student_logits, teacher_topk[0], teacher_topk[1], **opts)
    elif kind == "jsd":
        kl = jsd(student_logits, teacher_logits, beta=beta, **opts)
    else:
        kl = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[kind](student_logits, teacher_logits, **opts)
    loss_mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask) != 0
    ce, ce_metrics = masked_cross_entropy(student_logits, labels, loss_mask)
    ce = ce.astype(kl.dtype)
    loss = w_kl * kl + w_ce * ce
    return loss, {"loss": loss, "kl": kl, "ce": ce, "accuracy": ce_metrics["accuracy"]}


# ------------------------------------------------------------------------------------------ hidden states


def _project(fn: str, student_hidden: Array, teacher_hidden: Array, projection: Optional[Array], mask) -> Tuple[Array, Array]:
    """Checks, then (student_hidden @ projection, teacher_hidden) in the compute dtype, both (..., d_t)."""
    _expect_float(fn, "student_hidden", student_hidden)
    _expect_float(fn, "teacher_hidden", teacher_hidden)
    lead, d_s = student_hidden.shape[:-1], student_hidden.shape[-1]
    d_t = teacher_hidden.shape[-1]
    if projection is None:
        _expect_shape(fn, "teacher_hidden", teacher_hidden, student_hidden.shape,
                      " (the shape of `student_hidden`; pass `projection` (d_s, d_t) for different widths)")
    else:
        _expect_shape(fn, "teacher_hidden", teacher_hidden, lead + (None,),
                      " (the leading shape of `student_hidden`, then d_t)")
        _expect_float(fn, "projection", projection)
        _expect_shape(fn, "projection", projection, (d_s, d_t), " = (d_s, d_t)")
    _check_mask(fn, mask, lead)
    dtype = compute_dtype(student_hidden, teacher_hidden, projection)
    s = student_hidden.astype(dtype)
    if projection is not None:
        s = jnp.matmul(s, projection.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return s, teacher_hidden.astype(dtype)


def hidden_mse(student_hidden: Array, teacher_hidden: Array, *, projection: Optional[Array] = None,
               mask: Optional[Array] = None) -> Array:
    """Hidden-state alignment: mean over unmasked tokens of mean_d (student·W − teacher)².

    Args:
      student_hidden: (..., d_s) float; teacher_hidden: (..., d_t) float with the same leading shape.
      projection: optional (d_s, d_t) matrix W (a learned projection is a parameter passed in); without it
        d_s must equal d_t.
      mask: (...) nonzero = keep.
    Returns a scalar (float32, float64 for float64 inputs).
    """
    s, t = _project("hidden_mse", student_hidden, teacher_hidden, projection, mask)
    return masked_mean(jnp.mean(jnp.square(s - t), axis=-1), mask)


def hidden_cosine(student_hidden: Array, teacher_hidden: Array, *, projection: Optional[Array] = None,
                  mask: Optional[Array] = None, eps: float = 1e-8) -> Array:
    """Hidden-state alignment: mean over unmasked tokens of 1 − cos(student·W, teacher), in [0, 2].

    cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)), so a zero vector gives cos = 0 (loss 1) with finite
    gradients. Args as `hidden_mse`. Returns a scalar.
    """
    s, t = _project("hidden_cosine", student_hidden, teacher_hidden, projection, mask)
    eps2 = jnp.asarray(eps, s.dtype) ** 2
    norm_s = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(s), axis=-1), eps2))
    norm_t = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(t), axis=-1), eps2))
    cos = jnp.sum(s * t, axis=-1) / (norm_s * norm_t)
    return masked_mean(1.0 - cos, mask)
