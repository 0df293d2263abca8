"""`MeshConfig`: the sizes of the four mesh axes, and the Auto-axis mesh built from it."""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes ``data``, ``fsdp``, ``tensor`` and ``expert`` (1 each by default).

    One axis may be -1: it takes the devices the others leave (``MeshConfig(data=-1, tensor=4)`` on 8
    devices is data=2, tensor=4). The product of the sizes must equal the device count (`resolve`).
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig: `{name}` must be a positive int or -1 (the remaining devices); "
                                 f"got {size!r}")
        auto = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(auto) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1; got -1 for {', '.join(auto)}")

    def _describe(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in MESH_AXES)

    def resolve(self, num_devices: int) -> Tuple[int, ...]:
        """The axis sizes (data, fsdp, tensor, expert) for `num_devices` devices, -1 filled in.

        ValueError, naming the config keys, when the sizes do not multiply to `num_devices`."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fixed = math.prod(size for size in sizes.values() if size != -1)
        auto = [name for name, size in sizes.items() if size == -1]
        if auto:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig({self._describe()}): the fixed axes multiply to {fixed}, which does not divide "
                    f"the {num_devices} devices, so `{auto[0]}=-1` has no size; change "
                    f"{', '.join(f'`{n}`' for n in MESH_AXES if sizes[n] != 1 and n != auto[0]) or 'the sizes'}")
            sizes[auto[0]] = num_devices // fixed
        elif fixed != num_devices:
            used = [f"`{n}`" for n in MESH_AXES if sizes[n] != 1] or ["`data`"]
            raise ValueError(
                f"MeshConfig({self._describe()}): data·fsdp·tensor·expert = {fixed} but there are {num_devices} "
                f"devices; the product must equal the device count (change {', '.join(used)}, or set one "
                f"axis to -1 for the remaining devices)")
        return tuple(sizes[name] for name in MESH_AXES)


def make_mesh_from_config(config: MeshConfig, devices=None):
    """An Auto-axis mesh with the axes ("data", "fsdp", "tensor", "expert") sized by `config`.

    devices: default `jax.devices()`; all of them are used (the sizes must multiply to their count).
    Axes of size 1 are kept, so every rules table applies to every mesh.
    """
    import jax

    from mamba_jax.sharding import make_mesh

    if not isinstance(config, MeshConfig):
        raise ValueError(f"make_mesh_from_config: `config` must be a MeshConfig; got {type(config).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(config.resolve(len(devices)), MESH_AXES, devices=devices)
