"""The invariants every model keeps, on every layer kind and pattern, with trained-scale parameters:

- prefix causality: forward(x)[:, :i] == forward(x[:, :i]), and tokens after i change nothing before i;
- left-padded rows == unpadded (with NaN embeddings at the padding: masks select, never multiply);
- packed rows (seq_idx) == each document alone;
- ragged chunked prefill + step-by-step decoding == the full forward (unpadded and left-padded prompts);
- MoE families also in training mode, where the capacity binds (capacity factor 0.5: tokens are dropped).

Each invariant has a companion that plants a bug and shows the same assertion catches it. Sharded ==
unsharded runs in `test_sharded_invariants.py` (a subprocess with 8 devices).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import init_params
from tests.invariants import checks
from tests.invariants.families import FAMILIES, HALF, model_and_params, tokens

NAMES = list(FAMILIES)


@functools.lru_cache(maxsize=None)
def forward_outputs(name: str, deterministic: bool = True):
    model, params = model_and_params(name)
    rows, mask, seq_idx, docs = checks.forward_rows()
    return checks.forward_set(model, params, rows, mask, seq_idx, docs, deterministic=deterministic)


@pytest.fixture
def fresh_programs():
    """Companions patch library functions: compiled programs of the unpatched code must not be reused."""
    jax.clear_caches()
    forward_outputs.cache_clear()
    yield
    jax.clear_caches()
    forward_outputs.cache_clear()


# ------------------------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("name", NAMES)
def test_forward_invariants(name):
    full, alone = forward_outputs(name)
    checks.check_prefix_causality(full, alone, name)
    checks.check_padded(full, alone, name)
    checks.check_packed(full, alone, name)


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].moe])
def test_forward_invariants_in_training_with_binding_capacity(name):
    """Train mode (deterministic=False): the causal capacity drops tokens, yet a token's output depends on
    its own document's prefix only — at any length, with padding, packed with another document."""
    model, params = model_and_params(name)
    rows, mask, seq_idx, docs = checks.forward_rows()
    sown = model.apply({"params": params}, rows, mask=mask, seq_idx=seq_idx, deterministic=False,
                       mutable=["moe_metrics"])[1]
    dropped = max(float(v) for p, v in jax.tree_util.tree_leaves_with_path(sown) if "dropped" in str(p))
    assert dropped > 0.05, f"{name}: the capacity does not bind ({dropped})"
    full, alone = forward_outputs(name, deterministic=False)
    checks.check_prefix_causality(full, alone, name + " train")
    checks.check_padded(full, alone, name + " train")
    checks.check_packed(full, alone, name + " train")


@pytest.mark.parametrize("name", NAMES)
def test_decode_invariants(name):
    model, params = model_and_params(name)
    chunk1, mask1, chunk2, steps, _ = checks.decode_inputs()
    decoded = checks.decode_set(model, params, chunk1, mask1, chunk2, steps)
    checks.check_decode(decoded, forward_outputs(name)[0][0], name)


def test_state_matters():
    """The premise of the suite: with trained-scale parameters, removing the SSM's memory (A_log + 20: the
    state decays to nothing every step) changes the logits by O(1) — far above the tolerance — while at
    initialisation it changes them by ~1e-2 of their scale, which a state bug could hide in."""
    x = tokens(0, 2, 2 * HALF)
    no_memory = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, w: w + 20.0 if getattr(path[-1], "key", "") == "A_log" else w, p)
    for name in ("M[chunked]", "M2[chunked]"):
        model, params = model_and_params(name)
        apply = jax.jit(model.apply)
        for label, p, low, high in (("trained", params, 0.3, None),
                                    ("init", init_params(model, jax.random.PRNGKey(0), seq_len=4), None, 0.05)):
            a, b = apply({"params": p}, x), apply({"params": no_memory(p)}, x)
            change = float(jnp.abs(a - b).max())
            assert low is None or change > low, (name, label, change)
            assert high is None or change < high * float(jnp.abs(a).max()), (name, label, change)


# ------------------------------------------------------------------------------------------ companions

def _expect_failure(check, *args):
    with pytest.raises(AssertionError):
        check(*args)


def test_prefix_causality_can_fail(fresh_programs, monkeypatch):
    """Three planted leaks from the future, each caught by `check_prefix_causality`: MoE routing over the
    whole sequence (expert choice in place of the causal capacity), attention without its causal mask, and
    a Mamba scan run backwards in time."""
    import mamba_jax.layers.mamba as mamba
    import mamba_jax.ops.attention as attention_ops
    import mamba_jax.ops.moe as moe_ops

    def whole_sequence(logits, k, capacity_factor, *, token_mask=None, seq_idx=None):
        t, n = logits.shape[1], logits.shape[2]
        return moe_ops.route_expert_choice(logits, moe_ops.expert_capacity(t, n, k, capacity_factor),
                                           token_mask=token_mask)

    with monkeypatch.context() as m:
        m.setattr(moe_ops, "route_token_choice", whole_sequence)
        _expect_failure(checks.check_prefix_causality, *forward_outputs("M E[switch]", False), "planted")

    real_mask = attention_ops.attention_mask
    with monkeypatch.context() as m:   # causal_attention's blocks then see the rest of their block
        m.setattr(attention_ops, "attention_mask", lambda q, k, **kw: jnp.ones(q.shape + k.shape[1:], bool)
                  & real_mask(jnp.full_like(q, k.shape[1]), k, **kw))
        _expect_failure(checks.check_prefix_causality, *forward_outputs("A[rope,gqa]"), "planted")

    real_scan = mamba.selective_scan_on_mesh

    def backwards(u, delta, A, B, C, **kw):
        flip = lambda a: None if a is None else jnp.flip(a, axis=1)  # noqa: E731
        kw = dict(kw, z=flip(kw.get("z")), seq_idx=flip(kw.get("seq_idx")))
        y, state = real_scan(flip(u), flip(delta), A, flip(B), flip(C), **kw)
        return flip(y), state

    with monkeypatch.context() as m:
        m.setattr(mamba, "selective_scan_on_mesh", backwards)
        _expect_failure(checks.check_prefix_causality, *forward_outputs("M[chunked]"), "planted")


def test_padded_and_packed_can_fail(fresh_programs):
    """The mask ignored (NaN padding then reaches the state) fails `check_padded`; seq_idx ignored fails
    `check_packed`; and MoE training whose capacity ignores document starts fails `check_packed`."""
    model, params = model_and_params("M[chunked]")
    rows, mask, seq_idx, docs = checks.forward_rows()
    _expect_failure(checks.check_padded, *checks.forward_set(model, params, rows, mask, seq_idx, docs,
                                                             use_mask=False), "planted")
    _expect_failure(checks.check_packed, *checks.forward_set(model, params, rows, mask, seq_idx, docs,
                                                             use_seq_idx=False), "planted")


def test_moe_fixed_capacity_can_fail(fresh_programs, monkeypatch):
    """The previous routing's fixed budget per sequence (GShard / Switch: C = ceil(cf·t·k/E) slots from the
    start), planted in place of the causal schedule: the sequence length and the other packed document then
    change which tokens are dropped, and both `check_prefix_causality` and `check_packed` see it."""
    import mamba_jax.ops.moe as moe_ops
    real = moe_ops.prefix_capacity
    monkeypatch.setattr(moe_ops, "prefix_capacity", lambda t, e, k, cf: np.full(t, real(t, e, k, cf)[-1], np.int32))
    full, alone = forward_outputs("M E[switch]", False)
    _expect_failure(checks.check_prefix_causality, full, alone, "planted")
    _expect_failure(checks.check_packed, full, alone, "planted")


@pytest.mark.parametrize("name", ["M[chunked]", "M2[chunked]", "A[rope,gqa]"])
def test_decode_can_fail(fresh_programs, name):
    """A cache whose state is zeroed after the prefill, and a conv state (Mamba) or KV slots (attention)
    dropped between prefill chunks, are caught by `check_decode`."""
    model, params = model_and_params(name)
    chunk1, mask1, chunk2, steps, _ = checks.decode_inputs()
    reference = forward_outputs(name)[0][0]

    def zero(fields):
        def corrupt(cache):
            return cache._replace(layers=tuple(
                layer._replace(**{f: jnp.zeros_like(getattr(layer, f)) for f in fields if hasattr(layer, f)})
                for layer in cache.layers))
        return corrupt

    state = zero(("ssm_state", "valid"))
    chunk = zero(("conv_state", "valid"))
    for corrupt_chunk1, corrupt_prefill in ((None, state), (chunk, None)):
        decoded = checks.decode_set(model, params, chunk1, mask1, chunk2, steps, corrupt_chunk1, corrupt_prefill)
        _expect_failure(checks.check_decode, decoded, reference, "planted")
