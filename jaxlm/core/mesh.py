"""Builds the device mesh from per-axis ICI (within a slice) and DCN (across slices) sizes."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxlm.core.config import ConfigError, MeshConfig

# Outermost to innermost: the innermost axis gets the fastest links, so tensor parallelism goes last and
# pipeline stages, which only pass activations to their neighbour, go first (across slices if need be).
AXES = ("stage", "data", "fsdp", "sequence", "expert", "tensor")


def _resolve(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Replaces a single -1 so that the sizes multiply to `total`."""
    auto = [axis for axis, size in sizes.items() if size == -1]
    bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(auto) > 1:
        raise ConfigError(f"{what} sizes {', '.join(bad or auto)}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if total % known:
            raise ConfigError(
                f"{what} sizes {_fmt(sizes)} cannot fill {total} devices: {known} does not divide {total}"
            )
        sizes = {**sizes, auto[0]: total // known}
    if math.prod(sizes.values()) != total:
        raise ConfigError(
            f"{what} sizes {_fmt(sizes)} multiply to {math.prod(sizes.values())} but there are {total} "
            f"devices; set one axis to -1 or make the sizes multiply to {total}"
        )
    return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return " ".join(f"{a}={s}" for a, s in sizes.items())


def mesh_shape(config: MeshConfig, num_devices: int, num_slices: int = 1) -> dict[str, dict[str, int]]:
    """Returns {"ici": sizes, "dcn": sizes} with -1 resolved, or raises ConfigError."""
    if num_devices % num_slices:
        raise ConfigError(f"{num_devices} devices do not split evenly into {num_slices} slices")
    dcn = _resolve({a: getattr(config, f"dcn_{a}") for a in AXES}, num_slices, "mesh.dcn_*")
    ici = _resolve({a: getattr(config, a) for a in AXES}, num_devices // num_slices, "mesh (ICI)")
    return {"ici": ici, "dcn": dcn}


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    shape = mesh_shape(config, len(devices), num_slices)
    ici = [shape["ici"][a] for a in AXES]
    dcn = [shape["dcn"][a] for a in AXES]
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = np.array(devices).reshape(ici)
    # Auto axes: GSPMD propagates shardings from the logical constraints placed in the model.
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    return " ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "single device"
