"""Every selective-scan implementation equals the `lax.scan` reference in values and gradients, and the
reference equals an independent numpy loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mamba_jax.ops import IMPLS, resolve_impl, selective_scan, selective_state_steps, selective_state_update
from tests.ops.scan_reference_numpy import numpy_selective_scan

FAST_IMPLS = [i for i in IMPLS if i != "reference"]
FLOAT_ARGS = ("u", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_case(seed, b, l, d, n, groups=None, *, with_D=True, with_z=True, with_bias=True,
              with_h0=True, with_seq_idx=False, dtype=np.float32):
    """Random inputs in a realistic range (A < 0, Δ around softplus(0.5))."""
    rng = np.random.default_rng(seed)
    bc_shape = (b, l, n) if groups is None else (b, l, groups, n)
    case = dict(
        u=rng.normal(size=(b, l, d)),
        dt=rng.normal(size=(b, l, d)) * 0.5,
        A=-np.exp(rng.normal(size=(d, n)) * 0.5),
        B=rng.normal(size=bc_shape),
        C=rng.normal(size=bc_shape),
        D=rng.normal(size=(d,)) if with_D else None,
        z=rng.normal(size=(b, l, d)) if with_z else None,
        dt_bias=rng.normal(size=(d,)) * 0.5 if with_bias else None,
        initial_state=rng.normal(size=(b, d, n)) if with_h0 else None,
    )
    case = {k: None if v is None else jnp.asarray(v, dtype) for k, v in case.items()}
    if with_seq_idx:
        case["seq_idx"] = jnp.asarray(np.cumsum(rng.random((b, l)) < 0.15, axis=1), jnp.int32)
    return case


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "softplus"))
def run_scan(args, impl, chunk_size=None, softplus=True):
    return selective_scan(**args, dt_softplus=softplus, return_final_state=True, impl=impl,
                          chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def scan_with_vjp(args, cotangent_key, impl, chunk_size=None):
    """(y, last_state) and the gradients of <random cotangent, (y, last_state)> w.r.t. every float input."""
    floats = {k: v for k, v in args.items() if k in FLOAT_ARGS and v is not None}
    rest = {k: v for k, v in args.items() if k not in floats}
    fn = lambda f: selective_scan(**f, **rest, dt_softplus=True, return_final_state=True, impl=impl,
                                  chunk_size=chunk_size)
    out, vjp = jax.vjp(fn, floats)
    keys = jax.random.split(cotangent_key, 2)
    cot = tuple(jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, out))
    return out, vjp(cot)[0]


def assert_close(actual, expected, rtol, atol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


@st.composite
def scan_cases(draw):
    d = draw(st.integers(1, 12))
    groups = draw(st.sampled_from([None] + [g for g in (1, 2, 3, 4) if d % g == 0]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        b=draw(st.integers(1, 3)), l=draw(st.integers(1, 40)), d=d, n=draw(st.integers(1, 8)),
        groups=groups, with_D=draw(st.booleans()), with_z=draw(st.booleans()),
        with_bias=draw(st.booleans()), with_h0=draw(st.booleans()), with_seq_idx=draw(st.booleans()),
    ), draw(st.integers(1, 16))


@settings(max_examples=25)
@given(scan_cases())
def test_reference_matches_numpy_loop(case_and_chunk):
    case, _ = case_and_chunk
    args = make_case(**case)
    y, h = run_scan(args, "reference")
    y_np, h_np = numpy_selective_scan(**{k: v for k, v in args.items()}, dt_softplus=True)
    assert_close(y, y_np, 2e-5, 2e-5, "y")
    assert_close(h, h_np, 2e-5, 2e-5, "last_state")


@settings(max_examples=15)
@given(scan_cases())
def test_impls_match_reference_values_and_gradients(case_and_chunk):
    """Values, last state, and the vjp of one shared random cotangent w.r.t. every input."""
    case, chunk = case_and_chunk
    args = make_case(**case)
    key = jax.random.PRNGKey(case["seed"] % 1000)
    (y_ref, h_ref), g_ref = scan_with_vjp(args, key, "reference")
    for impl in FAST_IMPLS:
        (y, h), g = scan_with_vjp(args, key, impl, chunk)
        # float32 with other summation orders: errors of a few ulps of the largest magnitudes.
        assert_close(y, y_ref, 1e-5, 1e-5, f"{impl}: y")
        assert_close(h, h_ref, 1e-5, 1e-5, f"{impl}: last_state")
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            scale = float(jnp.max(jnp.abs(g_ref[name]))) + 1.0
            assert_close(g[name], g_ref[name], 1e-5, 2e-5 * scale, f"{impl}: grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 1, 3, 2, None), (1, 13, 4, 3, 2), (2, 9, 6, 2, 3)])
@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_float64_check_grads(impl, shape, with_seq_idx):
    """Finite differences in float64 against the implementation's own gradients (fwd and rev)."""
    b, l, d, n, groups = shape
    with jax.enable_x64(True):
        args = make_case(7, b, l, d, n, groups, with_seq_idx=with_seq_idx, dtype=np.float64)
        seq_idx = args.pop("seq_idx", None)
        names = sorted(args)

        @jax.jit  # one compile per transformation; the finite differences reuse it
        def f(*floats):
            y, h = selective_scan(**dict(zip(names, floats)), seq_idx=seq_idx, dt_softplus=True,
                                  return_final_state=True, impl=impl, chunk_size=4)
            return y, h

        # `chunked` has a custom VJP (hand-written backward), so reverse mode only.
        modes = ("rev",) if impl == "chunked" else ("fwd", "rev")
        check_grads(f, tuple(args[k] for k in names), order=1, modes=modes, eps=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_stays_float64(impl):
    with jax.enable_x64(True):
        args = make_case(3, 2, 10, 4, 3, dtype=np.float64)
        y, h = run_scan(args, impl, 4)
        assert y.dtype == jnp.float64 and h.dtype == jnp.float64
        y_np, h_np = numpy_selective_scan(**args, dt_softplus=True)
        assert_close(y, y_np, 1e-12, 1e-12)
        assert_close(h, h_np, 1e-12, 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_float32_state(impl, dtype):
    """bf16/fp16 in, same dtype out; state in float32: equal to the float32 scan of the same values."""
    args = make_case(5, 2, 300, 8, 4, dtype=np.float32)
    low = {k: None if v is None else v.astype(dtype) for k, v in args.items()}
    as_f32 = {k: None if v is None else v.astype(jnp.float32) for k, v in low.items()}
    y, h = run_scan(low, impl, 64)
    y_ref, h_ref = run_scan(as_f32, "reference")
    assert y.dtype == dtype and h.dtype == jnp.float32
    assert_close(h, h_ref, 1e-5, 1e-5, "state computed in float32")
    # Only the final cast rounds: relative error ≤ half an ulp of the output dtype.
    eps = float(jnp.finfo(dtype).eps)
    assert_close(y, y_ref, eps, 1e-6, "output rounded once")


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_sequences_equal_separate_sequences(impl):
    """seq_idx resets the state: a packed row equals its pieces scanned alone (each from zero)."""
    lengths = [5, 1, 11, 7]
    args = make_case(11, 1, sum(lengths), 6, 4, groups=2, with_h0=False)
    seq_idx = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    y_packed, h_packed = run_scan({**args, "seq_idx": seq_idx}, impl, 4)
    start = 0
    for length in lengths:
        piece = {k: None if v is None or v.ndim < 3 else v[:, start:start + length] for k, v in args.items()}
        piece["A"], piece["D"], piece["dt_bias"] = args["A"], args["D"], args["dt_bias"]
        y_alone, h_alone = run_scan(piece, "reference")
        assert_close(y_packed[:, start:start + length], y_alone, 1e-5, 1e-5, f"segment at {start}")
        start += length
    assert_close(h_packed, h_alone, 1e-5, 1e-5, "last state = last segment's state")


@pytest.mark.parametrize("impl", IMPLS)
def test_initial_state_continues_a_split_sequence(impl):
    """scan(x1 ++ x2) == scan(x2, initial_state=scan(x1).last_state), gradients flow through it."""
    args = make_case(13, 2, 23, 4, 3, with_h0=False)
    split = lambda v, a, b: None if v is None or v.ndim < 3 else v[:, a:b]
    first = {k: split(v, 0, 9) if v is not None and v.ndim >= 3 else v for k, v in args.items()}
    second = {k: split(v, 9, 23) if v is not None and v.ndim >= 3 else v for k, v in args.items()}
    y_all, h_all = run_scan(args, impl, 4)
    y1, h1 = run_scan(first, impl, 4)
    y2, h2 = run_scan({**second, "initial_state": h1}, impl, 4)
    assert_close(jnp.concatenate([y1, y2], 1), y_all, 1e-5, 1e-5)
    assert_close(h2, h_all, 1e-5, 1e-5)


@pytest.mark.parametrize("impl", ["chunked", "chunked_associative"])
@pytest.mark.parametrize("l,chunk", [(1, 4), (7, 3), (16, 16), (17, 16), (5, 64)])
def test_chunked_any_length(impl, l, chunk):
    args = make_case(17, 2, l, 5, 3, with_seq_idx=True)
    y_ref, h_ref = run_scan(args, "reference")
    y, h = run_scan(args, impl, chunk)
    assert_close(y, y_ref, 1e-5, 1e-5)
    assert_close(h, h_ref, 1e-5, 1e-5)


def test_no_softplus_and_return_y_only():
    args = make_case(19, 1, 6, 3, 2)
    args["dt"] = jnp.abs(args["dt"])
    y = selective_scan(**args, impl="reference")
    assert isinstance(y, jax.Array) and y.shape == (1, 6, 3)
    y_np, _ = numpy_selective_scan(**args, dt_softplus=False)
    assert_close(y, y_np, 2e-5, 2e-5)


def test_selective_state_update_equals_one_scan_step():
    args = make_case(23, 3, 1, 6, 4, groups=2)
    y_scan, h_scan = run_scan(args, "reference")
    y, h = selective_state_update(
        args["initial_state"], args["u"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0],
        args["C"][:, 0], D=args["D"], z=args["z"][:, 0], dt_bias=args["dt_bias"], dt_softplus=True)
    assert_close(y, y_scan[:, 0], 1e-6, 1e-6)
    assert_close(h, h_scan, 1e-6, 1e-6)


def test_selective_state_steps_keeps_the_state_after_every_position():
    """Against the numpy scan run on each prefix: y, and the state after position i == the final state of
    the first i + 1 positions (speculative decoding rolls back to any of them)."""
    args = make_case(24, 2, 5, 6, 4, groups=2, with_bias=False)
    delta = jax.nn.softplus(args["dt"])
    y, states = selective_state_steps(args["initial_state"], args["u"], delta, args["A"], args["B"], args["C"],
                                      D=args["D"], z=args["z"])
    assert states.shape == (2, 5, 6, 4)
    for i in range(5):
        prefix = {k: (v[:, :i + 1] if k in ("u", "dt", "B", "C", "z") else v) for k, v in args.items()}
        y_ref, h_ref = numpy_selective_scan(**{k: None if v is None else np.asarray(v, np.float64)
                                               for k, v in prefix.items()}, dt_softplus=True)
        assert_close(states[:, i], h_ref, 1e-5, 1e-5)
        assert_close(y[:, i], y_ref[:, i], 1e-5, 1e-5)


def test_auto_is_a_real_impl_and_matches_reference():
    for l in (1, 1024, 16384):
        assert resolve_impl("auto", l, "cpu") == "chunked"
        assert resolve_impl("auto", l, "tpu") == "pallas"
        assert resolve_impl("auto", l, "gpu") == "chunked_associative"   # until the Triton kernels ran on a GPU
        assert resolve_impl("auto", l, "metal") in IMPLS
    args = make_case(29, 1, 12, 3, 2)
    assert_close(run_scan(args, "auto")[0], run_scan(args, "reference")[0], 0, 0)


def test_backward_memory_is_bounded_for_chunked():
    """Compiled fwd+bwd temp memory grows with l like O(b·l·(d+n)) for chunked, O(b·l·d·n) for reference."""
    b, d, n = 1, 32, 16

    def temp_bytes(impl, l):
        args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in
                dict(u=(b, l, d), dt=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n)).items()}
        loss = lambda a: jnp.sum(selective_scan(**a, dt_softplus=True, impl=impl, chunk_size=128))
        return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes

    l_short, l_long = 2048, 8192
    per_step = {impl: (temp_bytes(impl, l_long) - temp_bytes(impl, l_short)) / (l_long - l_short)
                for impl in ("reference", "chunked", "chunked_associative")}
    state_bytes_per_step = b * d * n * 4
    io_bytes_per_step = b * (2 * d + 2 * n) * 4  # u, dt, B, C (and as many gradients)
    assert per_step["reference"] >= state_bytes_per_step  # keeps every state for backward
    assert per_step["chunked"] <= 4 * io_bytes_per_step < state_bytes_per_step, per_step
    assert per_step["chunked_associative"] <= 4 * io_bytes_per_step, per_step


# --- input validation ----------------------------------------------------------------------------

def _bad(**overrides):
    args = make_case(31, 2, 8, 4, 3)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,match", [
    (dict(u=jnp.zeros((8, 4))), r"`u` must have shape \(b, l, d\); got \(8, 4\)"),
    (dict(dt=jnp.zeros((2, 7, 4))), r"`dt` must have shape \(2, 8, 4\); got \(2, 7, 4\)"),
    (dict(A=jnp.zeros((5, 3))), r"`A` must have shape \(4, n\)"),
    (dict(B=jnp.zeros((2, 8, 2))), r"`B` must have shape \(2, 8, 3\)"),
    (dict(B=jnp.zeros((2, 8, 3, 3)), C=jnp.zeros((2, 8, 3, 3))), r"3 groups, which must divide d=4"),
    (dict(C=jnp.zeros((2, 8, 1, 3))), r"`C` must have shape \(2, 8, 3\)"),
    (dict(D=jnp.zeros((3,))), r"`D` must have shape \(4,\)"),
    (dict(z=jnp.zeros((2, 8, 5))), r"`z` must have shape"),
    (dict(initial_state=jnp.zeros((2, 4, 4))), r"`initial_state` must have shape \(2, 4, 3\)"),
    (dict(seq_idx=jnp.zeros((2, 8))), r"`seq_idx` must be an integer array"),
    (dict(seq_idx=jnp.zeros((2, 9), jnp.int32)), r"`seq_idx` must have shape \(2, 8\)"),
    (dict(u=jnp.zeros((2, 8, 4), jnp.int32)), r"`u` must be a floating-point array"),
])
def test_bad_inputs_name_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_bad(**overrides))


def test_bad_impl_and_chunk_size():
    with pytest.raises(ValueError, match="`impl` must be one of"):
        selective_scan(**_bad(), impl="fast")
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        selective_scan(**_bad(), impl="chunked", chunk_size=0)


def test_validation_happens_at_trace_time_only():
    """Under jit the checks run once while tracing; a bad shape fails before any compute."""
    traces = []

    @jax.jit
    def f(u):
        traces.append(1)
        return selective_scan(u, u, jnp.ones((4, 3)) * -1, jnp.ones((2, 8, 3)), jnp.ones((2, 8, 3)))

    f(jnp.ones((2, 8, 4)))
    f(jnp.ones((2, 8, 4)) * 2)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="`dt`|`B`"):
        f(jnp.ones((2, 9, 4)))
