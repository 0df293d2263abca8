"""Attention ops vs independent numpy references (float64 loops), HF Llama's rotary, and bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax.ops import attention_mask, dot_product_attention, rotary_embedding, segment_ids
from mamba_jax.ops.attention import cached_attention, causal_attention


def _rng(seed):
    return np.random.RandomState(seed)


# --------------------------------------------------------------------------------------------------
# rotary
# --------------------------------------------------------------------------------------------------

def rotary_numpy(x, positions, theta):
    """Complex-number rotary in float64: (x1 + i·x2) · exp(i · pos · theta^(-2j/dh)), halves not interleaved."""
    x = np.asarray(x, np.float64)
    dh = x.shape[-1]
    half = dh // 2
    freqs = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / dh)
    angle = np.asarray(positions, np.float64)[:, :, None, None] * freqs  # (b, l, 1, half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("dh,theta", [(8, 10000.0), (2, 500.0), (12, 1e6)])
def test_rotary_matches_numpy(dh, theta):
    r = _rng(dh)
    x = r.randn(2, 7, 3, dh).astype(np.float32)
    pos = r.randint(0, 300, (2, 7)).astype(np.int32)
    out = rotary_embedding(jnp.asarray(x), jnp.asarray(pos), theta)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, rotary_numpy(x, pos, theta), rtol=1e-5, atol=2e-5)


def test_rotary_matches_transformers_apply_rotary_pos_emb():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    config = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4, head_dim=12,
                                      rope_parameters={"rope_type": "default", "rope_theta": 321.0})
    r = _rng(1)
    q = r.randn(2, 9, 4, 12).astype(np.float32)
    k = r.randn(2, 9, 2, 12).astype(np.float32)
    pos = np.stack([np.arange(9), np.arange(40, 49)]).astype(np.int64)
    with torch.no_grad():
        rope = ml.LlamaRotaryEmbedding(config)
        qt = torch.from_numpy(q).transpose(1, 2)  # HF layout (b, h, l, dh)
        kt = torch.from_numpy(k).transpose(1, 2)
        cos, sin = rope(qt, torch.from_numpy(pos))
        q_hf, k_hf = ml.apply_rotary_pos_emb(qt, kt, cos, sin)
    pos_j = jnp.asarray(pos, jnp.int32)
    np.testing.assert_allclose(rotary_embedding(jnp.asarray(q), pos_j, 321.0), q_hf.transpose(1, 2).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rotary_embedding(jnp.asarray(k), pos_j, 321.0), k_hf.transpose(1, 2).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    r = _rng(2)
    q, k = r.randn(1, 1, 1, 16).astype(np.float32), r.randn(1, 1, 1, 16).astype(np.float32)
    score = lambda pq, pk: float(jnp.sum(rotary_embedding(jnp.asarray(q), jnp.full((1, 1), pq, jnp.int32))
                                         * rotary_embedding(jnp.asarray(k), jnp.full((1, 1), pk, jnp.int32))))
    np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rotary_keeps_bfloat16_and_position_zero_is_identity():
    x = jnp.asarray(_rng(3).randn(1, 4, 2, 8), jnp.bfloat16)
    out = rotary_embedding(x, jnp.zeros((1, 4), jnp.int32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))


# --------------------------------------------------------------------------------------------------
# dot-product attention
# --------------------------------------------------------------------------------------------------

def attention_numpy(q, k, v, allowed, scale):
    """A float64 loop: per batch row, query head i reads kv head i // (h / kv); softmax over allowed keys,
    zeros when none is allowed."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, h, _ = q.shape
    kv = k.shape[2]
    out = np.zeros((b, lq, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // kv)
            for i in range(lq):
                keys = np.flatnonzero(allowed[bi, i])
                if keys.size == 0:
                    continue
                s = np.array([q[bi, i, hi] @ k[bi, j, kh] * scale for j in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = p @ v[bi, keys, kh]
    return out


@pytest.mark.parametrize("h,kv", [(4, 4), (6, 2), (6, 3), (4, 1)])
def test_attention_matches_numpy_loop_with_gqa_and_masks(h, kv):
    r = _rng(h * 10 + kv)
    b, lq, lk, dh, dv = 2, 5, 9, 8, 6
    q = r.randn(b, lq, h, dh).astype(np.float32)
    k = r.randn(b, lk, kv, dh).astype(np.float32)
    v = r.randn(b, lk, kv, dv).astype(np.float32)
    allowed = r.rand(b, lq, lk) < 0.6
    allowed[0, 1] = False  # one fully masked row
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed))
    assert out.shape == (b, lq, h, dv) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, attention_numpy(q, k, v, allowed, dh ** -0.5), rtol=1e-5, atol=1e-5)
    custom = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed), scale=0.3)
    np.testing.assert_allclose(custom, attention_numpy(q, k, v, allowed, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 4, 11, 256])
@pytest.mark.parametrize("h,kv", [(4, 2), (3, 3)])
def test_cached_attention_reads_only_filled_blocks_and_matches_the_loop(block_size, h, kv):
    """n_keys = 10 of 11 slots: blocks of 3 (or 4) shift the last block back to slots 8–10 (7–10) after 6–8
    (4–7) were read, so without the already-read mask slot 8 (7) would count twice; the unfilled slot holds
    NaN (it must reach no output); one query has no allowed key; two packed segments; lq = 4 queries at
    slots 6–9 (a chunked prefill), and lq = 1 at slot 9 (a decode step)."""
    r = _rng(block_size + 7 * h)
    b, max_len, dh, dv = 2, 11, 8, 6
    n_keys = 10
    k = r.randn(b, max_len, kv, dh).astype(np.float32)
    v = r.randn(b, max_len, kv, dv).astype(np.float32)
    k[:, n_keys:], v[:, n_keys:] = np.nan, np.nan
    valid = r.rand(b, max_len) < 0.8
    valid[1, :7] = False                                        # row 1: left padding up to slot 6
    k_seg = np.zeros((b, max_len), np.int32)
    k_seg[0, 6:] = 1                                            # row 0: a second document from slot 6
    for lq, first in ((4, 6), (1, 9)):
        q = r.randn(b, lq, h, dh).astype(np.float32)
        q_slots = np.broadcast_to(first + np.arange(lq, dtype=np.int32), (b, lq))
        q_seg = k_seg[np.arange(b)[:, None], q_slots]
        allowed = np.asarray(attention_mask(jnp.asarray(q_slots), jnp.asarray(np.broadcast_to(
            np.arange(max_len, dtype=np.int32), (b, max_len))), key_valid=jnp.asarray(valid),
            q_segments=jnp.asarray(q_seg), k_segments=jnp.asarray(k_seg)))
        if lq == 4:
            valid_q0 = allowed[1, 0].any()
            assert not valid_q0                                 # row 1's first query (slot 6) sees only pads
        want = attention_numpy(q, k, v, allowed, dh ** -0.5)
        got = jax.jit(lambda *a: cached_attention(*a[:4], n_keys=a[4], key_valid=a[5], q_segments=a[6],
                                                  k_segments=a[7], block_size=block_size))(
            q, k, v, q_slots, jnp.int32(n_keys), valid, q_seg, k_seg)
        assert got.shape == (b, lq, h, dv) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [None, 1, 3, 4, 13])
def test_causal_attention_in_blocks_matches_the_loop(block_size):
    """Blocks of 3 or 4 over 11 positions (a ragged last block), left padding in row 1 (NaN in its padded
    keys and values must reach no output), two packed segments in row 0, GQA 6 query / 2 kv heads."""
    r = _rng(40 + (block_size or 0))
    b, l, h, kv, dh, dv = 2, 11, 6, 2, 8, 5
    q = r.randn(b, l, h, dh).astype(np.float32)
    k = r.randn(b, l, kv, dh).astype(np.float32)
    v = r.randn(b, l, kv, dv).astype(np.float32)
    valid = np.ones((b, l), bool)
    valid[1, :3] = False
    k[1, :3], v[1, :3] = np.nan, np.nan
    seg = np.zeros((b, l), np.int32)
    seg[0, 5:] = 1
    slots = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))
    allowed = (slots[:, None, :] <= slots[:, :, None]) & valid[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    got = causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_valid=jnp.asarray(valid),
                           segments=jnp.asarray(seg), block_size=block_size)
    np.testing.assert_allclose(got, attention_numpy(q, k, v, allowed, dh ** -0.5), rtol=1e-5, atol=1e-5)


def test_causal_attention_fused_equals_blocked_and_its_gradients_float64():
    """fused=True (jax.nn.dot_product_attention, is_causal) gives the blocked values; the blocked form is
    differentiable (check_grads in float64); bad arguments name themselves."""
    r = _rng(41)
    q, k, v = (jnp.asarray(r.randn(*s), jnp.float32) for s in ((2, 9, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
    np.testing.assert_allclose(causal_attention(q, k, v, fused=True), causal_attention(q, k, v, block_size=4),
                               rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(r.randn(*s)) for s in ((1, 5, 2, 4), (1, 5, 1, 4), (1, 5, 1, 4)))
        check_grads(lambda q, k, v: causal_attention(q, k, v, block_size=2), (q, k, v), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="`block_size`"):
        causal_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="fused=True takes no padding"):
        causal_attention(q, k, v, key_valid=jnp.ones((1, 5), bool), fused=True)
    with pytest.raises(ValueError, match="as many keys as queries"):
        causal_attention(q, k[:, :4], v[:, :4])


def test_cached_attention_bfloat16_and_bad_block_size():
    r = _rng(3)
    q, k, v = (jnp.asarray(r.randn(*s), jnp.bfloat16) for s in ((1, 1, 2, 4), (1, 6, 1, 4), (1, 6, 1, 4)))
    kw = dict(n_keys=5, key_valid=jnp.ones((1, 6), bool), q_segments=jnp.zeros((1, 1), jnp.int32),
              k_segments=jnp.zeros((1, 6), jnp.int32))
    slots = jnp.full((1, 1), 4, jnp.int32)
    got = cached_attention(q, k, v, slots, block_size=2, **kw)
    allowed = jnp.arange(6)[None, None] <= 4
    want = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), allowed)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)   # bf16 output rounding
    with pytest.raises(ValueError, match="block_size"):
        cached_attention(q, k, v, slots, block_size=0, **kw)


def test_fully_masked_rows_stay_finite_with_huge_logits():
    q = jnp.full((1, 3, 2, 4), 1e4, jnp.float32)
    k = jnp.full((1, 5, 1, 4), 1e4, jnp.float32)
    v = jnp.asarray(_rng(4).randn(1, 5, 1, 4), jnp.float32)
    out = dot_product_attention(q, k, v, jnp.zeros((1, 3, 5), bool))
    assert bool(jnp.all(jnp.isfinite(out)))
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, jnp.zeros((1, 3, 5), bool))))(q)
    assert bool(jnp.all(jnp.isfinite(grads)))
    bf = dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                               jnp.eye(3, 5, dtype=bool)[None])
    assert bf.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(bf)))


def test_attention_gradients_float64():
    with jax.enable_x64(True):
        r = _rng(5)
        q, k, v = (jnp.asarray(r.randn(*s)) for s in [(1, 3, 4, 4), (1, 4, 2, 4), (1, 4, 2, 4)])
        allowed = jnp.asarray(r.rand(1, 3, 4) < 0.7).at[:, :, 0].set(True)
        check_grads(lambda q, k, v: dot_product_attention(q, k, v, allowed), (q, k, v), order=1,
                    modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# masks and segments
# --------------------------------------------------------------------------------------------------

def test_attention_mask_matches_loop():
    r = _rng(6)
    b, lq, lk = 2, 4, 7
    q_slots = np.stack([np.arange(3, 7)] * b).astype(np.int32)
    k_slots = np.stack([np.arange(lk)] * b).astype(np.int32)
    valid = r.rand(b, lk) < 0.7
    q_seg, k_seg = r.randint(0, 2, (b, lq)).astype(np.int32), r.randint(0, 2, (b, lk)).astype(np.int32)
    got = np.asarray(attention_mask(jnp.asarray(q_slots), jnp.asarray(k_slots), key_valid=jnp.asarray(valid),
                                    q_segments=jnp.asarray(q_seg), k_segments=jnp.asarray(k_seg)))
    for bi in range(b):
        for i in range(lq):
            for j in range(lk):
                expected = k_slots[bi, j] <= q_slots[bi, i] and valid[bi, j] and q_seg[bi, i] == k_seg[bi, j]
                assert got[bi, i, j] == expected
    plain = np.asarray(attention_mask(jnp.asarray(q_slots), jnp.asarray(k_slots)))
    np.testing.assert_array_equal(plain, k_slots[:, None, :] <= q_slots[:, :, None])


def test_segment_ids_count_changes():
    seq_idx = jnp.asarray([[0, 0, 1, 1, 0], [5, 5, 5, 2, 2]], jnp.int32)
    np.testing.assert_array_equal(segment_ids(seq_idx), [[0, 0, 1, 1, 2], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(segment_ids(seq_idx, jnp.asarray([3, 0], jnp.int32)),
                                  [[3, 3, 4, 4, 5], [0, 0, 0, 1, 1]])


@pytest.mark.parametrize("call,match", [
    (lambda: rotary_embedding(jnp.zeros((1, 2, 3, 5)), jnp.zeros((1, 2), jnp.int32)), "head_dim.*even.*5"),
    (lambda: rotary_embedding(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32)), r"`x` must have shape \(b, l, h, dh\)"),
    (lambda: rotary_embedding(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2))), "`positions` must be an integer"),
    (lambda: rotary_embedding(jnp.zeros((1, 2, 3, 4)), jnp.zeros((2, 2), jnp.int32)), r"`positions` must have shape \(1, 2\)"),
    (lambda: dot_product_attention(jnp.zeros((1, 2, 6, 4)), jnp.zeros((1, 3, 4, 4)), jnp.zeros((1, 3, 4, 4)),
                                   jnp.ones((1, 2, 3), bool)), "multiple of the number of key/value heads"),
    (lambda: dot_product_attention(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 3, 2, 4)),
                                   jnp.ones((1, 2, 3), bool)), r"`k` must have shape \(1, lk, kv, 4\)"),
    (lambda: dot_product_attention(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 5, 2, 4)),
                                   jnp.ones((1, 2, 3), bool)), r"`v` must have shape \(1, 3, 2, dv\)"),
    (lambda: dot_product_attention(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 2, 4)),
                                   jnp.ones((1, 3, 2), bool)), r"`allowed` must have shape \(1, 2, 3\)"),
    (lambda: attention_mask(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                            q_segments=jnp.zeros((1, 2), jnp.int32)), "both `q_segments`"),
    (lambda: attention_mask(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                            key_valid=jnp.ones((1, 2), bool)), r"`key_valid` must have shape \(1, 3\)"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_under_a_mask_reaches_no_output():
    """Keys/values no query may read (padding) hold NaN: the outputs of every query equal those with the
    NaNs replaced by anything finite (masks select). A probability-times-value product would give NaN
    everywhere (0 · NaN), which this test sees."""
    r = _rng(7)
    b, l, h, dh = 2, 6, 2, 4
    q, k, v = (jnp.asarray(r.randn(b, l, h, dh), jnp.float32) for _ in range(3))
    slots = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    valid = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    allowed = attention_mask(slots, slots, key_valid=valid)
    poison = lambda a: jnp.where(valid[:, :, None, None], a, jnp.nan)
    clean = dot_product_attention(q, k, v, allowed)
    dirty = dot_product_attention(q, poison(k), poison(v), allowed)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    assert np.isfinite(np.asarray(dirty)).all()
    np.testing.assert_array_equal(np.asarray(dirty)[0, :2], 0.0)   # padding queries attend to nothing
    # the multiply-based form this replaced leaks the NaN into every real query of the row
    probs = jax.nn.softmax(jnp.where(allowed[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, poison(k)), -1e30), -1)
    leaky = jnp.einsum("bhqk,bkhd->bqhd", probs, poison(v))
    assert np.isnan(np.asarray(leaky)[0, 2:]).all()
