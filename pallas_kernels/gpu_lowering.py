"""Pallas Triton kernels: the shared `pallas_call` (`triton_call`) and lowering them for an NVIDIA GPU from
a host without one.

`jax.export` lowers a function for another platform without its backend: for `platforms=["cuda"]` every
Triton-variant `pallas_call` is lowered to Triton IR (TTIR) on this host, so Pallas-level errors — shapes
that are not powers of two, unsupported primitives, bad block specs — surface on a CPU machine. What it
does not check is Triton's own compilation of that IR to PTX, which XLA runs on the GPU at compile time.
"""
from __future__ import annotations

import jax

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA with `args` (arrays or `jax.ShapeDtypeStruct`s).

    Raises whatever the Pallas Triton lowering raises. The Triton custom call has no serialisation
    compatibility guarantee, so the export check for it is disabled: the result is for inspection, not
    for storing."""
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)],
    )(*args)
    return exported.mlir_module()


def triton_kernel_names(mlir_text: str) -> list[str]:
    """The `name = "..."` of every Triton custom call in a lowered module, in order."""
    import re

    names = []
    for line in mlir_text.splitlines():
        if TRITON_CUSTOM_CALL in line:
            m = re.search(r'name = "([^"]+)"', line)
            names.append(m.group(1) if m else "?")
    return names


def triton_call(kernel_for, inputs, outputs, specs, grid, *, name: str, interpret, num_warps: int):
    """`pl.pallas_call` on the Triton backend with named operands: the non-None `inputs` (name → array)
    then `outputs` (name → `jax.ShapeDtypeStruct`), each with its BlockSpec in `specs` (name → spec).
    `kernel_for(in_names, out_names)` returns the kernel body for the operands present. One stage: the
    kernels walk their sequence in a loop of their own. Returns name → output array."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltr

    in_names = tuple(k for k, v in inputs.items() if v is not None)
    out_names = tuple(outputs)
    outs = pl.pallas_call(
        kernel_for(in_names, out_names),
        out_shape=tuple(outputs.values()),
        grid=grid,
        in_specs=[specs[k] for k in in_names],
        out_specs=tuple(specs[k] for k in out_names),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*(inputs[k] for k in in_names))
    return dict(zip(out_names, outs))
