"""The models' `scan_impl="pallas"` / `scan_impl="pallas"` on a GPU: a whole train-step gradient of a
MambaLM and of a Mamba2LM lowers for CUDA on this CPU host with the Triton kernels of both directions in
it (and no interpreted kernel: Pallas interpret mode would lower to plain HLO loops without a Triton
call). Triton's compilation and a run need a GPU (see pallas_kernels/README.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.models import Mamba2LM, MambaLM, init_params
from pallas_kernels.gpu_lowering import lower_for_cuda, triton_kernel_names


def _loss_grad_text(model, seq_len=40):
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((2, seq_len), jnp.int32)

    def grads(params, tokens):
        def loss(p):
            logits = model.apply({"params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
                logits, tokens[..., None], axis=-1)[..., 0])
        return jax.grad(loss)(params)

    return lower_for_cuda(grads, params, tokens)


@pytest.mark.parametrize("model, kernels", [
    (MambaLM(MambaConfig(vocab_size=64, d_model=32, n_layer=2, d_state=16, scan_impl="pallas")),
     ["selective_scan_fwd_triton", "selective_scan_bwd_triton"]),
    (Mamba2LM(Mamba2Config(vocab_size=64, d_model=32, n_layer=2, d_state=16, head_dim=16, chunk_size=32,
                           scan_impl="pallas")),
     ["ssd_fwd_triton", "ssd_bwd_triton"]),
], ids=["mamba", "mamba2"])
def test_model_train_gradient_lowers_with_triton_kernels(model, kernels):
    names = triton_kernel_names(_loss_grad_text(model))
    n_layer = model.config.n_layer
    assert sorted(names) == sorted(kernels * n_layer), names
