"""make_mesh builds Auto-axis meshes; a batch-sharded MambaLM forward on 2 host devices == 1 device."""
import subprocess
import sys
import textwrap

import jax
import pytest

from mamba_jax.sharding import make_mesh


def test_mesh_axes_are_auto_and_bad_shapes_are_errors():
    mesh = make_mesh((1,), ("data",))
    assert mesh.axis_names == ("data",) and mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match=r"needs 4 devices; 1 available"):
        make_mesh((2, 2), ("data", "tensor"))
    with pytest.raises(ValueError, match="differ in length"):
        make_mesh((1,), ("data", "tensor"))


def test_batch_sharded_forward_on_two_host_devices_equals_one_device():
    """Runs in a subprocess: the fake device count must be set before jax starts."""
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
        import jax, jax.numpy as jnp, numpy as np
        from mamba_jax.models import MambaConfig, MambaLM, init_params
        from mamba_jax.sharding import make_mesh
        assert len(jax.devices()) == 2
        model = MambaLM(MambaConfig(vocab_size=40, d_model=16, n_layer=2, d_state=4))
        params = init_params(model, jax.random.PRNGKey(0))
        ids = jax.random.randint(jax.random.PRNGKey(1), (4, 9), 0, 40)
        mesh = make_mesh((2,), ("data",))
        batch = jax.NamedSharding(mesh, jax.P("data"))
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x), out_shardings=batch)
        sharded = fwd(jax.device_put(params, jax.NamedSharding(mesh, jax.P())), jax.device_put(ids, batch))
        assert len(sharded.sharding.device_set) == 2
        np.testing.assert_allclose(sharded, model.apply({"params": params}, ids), rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_batch_split_axes_use_the_data_axes_the_batch_fills():
    """A batch (or gradient-accumulation micro-batch) too small for every data-parallel axis is split over
    the ones it fills, in order, instead of being left unconstrained (replicated)."""
    from jax.sharding import AbstractMesh

    from mamba_jax.sharding.kernels import batch_split_axes

    mesh = AbstractMesh((2, 4, 2, 1), ("data", "fsdp", "tensor", "expert"))
    assert batch_split_axes(mesh, 16) == ("data", "fsdp")
    assert batch_split_axes(mesh, 8) == ("data", "fsdp")
    assert batch_split_axes(mesh, 4) == ("data",)        # 2 · 4 does not divide 4: fsdp stays out
    assert batch_split_axes(mesh, 2) == ("data",)
    assert batch_split_axes(mesh, 3) == ()


def test_a_wrong_impl_name_fails_the_same_way_for_both_ops():
    import pytest

    from mamba_jax.ops import resolve_impl, resolve_ssd_impl

    with pytest.raises(ValueError, match=r"selective_scan: `impl` must be one of .*got 'magic'"):
        resolve_impl("magic", 8)
    with pytest.raises(ValueError, match=r"ssd: `impl` must be one of .*got 'magic'"):
        resolve_ssd_impl("magic")
