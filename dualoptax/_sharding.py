"""Sharding carried in array types (a mesh with explicit axes).

``jax.make_mesh`` gives its axes ``AxisType.Explicit`` by default: arrays
placed on such a mesh carry their ``NamedSharding`` in their traced type, and
JAX checks it, so an array the step creates (a zero update, a loop's initial
carry) must be created in the sharding of the arrays it meets. Under a mesh
with ``Auto`` axes (``jax.sharding.Mesh``'s default) types carry no sharding
and these helpers change nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from dualoptax.quantization import QuantizedArray


def explicit(x: Any) -> Optional[jax.sharding.NamedSharding]:
  """The sharding in ``x``'s type where its mesh has an explicit axis, else
  None (no mesh, ``Auto`` axes, or not an array)."""
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  return sharding if on_explicit_mesh(sharding) else None


def on_explicit_mesh(sharding: Any) -> bool:
  """Whether ``sharding`` is a ``NamedSharding`` on a mesh with an explicit
  axis."""
  mesh = getattr(sharding, "mesh", None)
  return (
    isinstance(sharding, jax.sharding.NamedSharding)
    and not mesh.empty
    and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)
  )


def struct(shape: Any, dtype: Any, like: Any = None) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct`` in ``like``'s explicit sharding (if any)."""
  sharding = None if like is None else explicit(like)
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of ``s``'s shape and dtype, in its sharding where that is an
  explicit mesh's (see :func:`struct`)."""
  sharding = getattr(s, "sharding", None)
  if not on_explicit_mesh(sharding):
    return jnp.zeros(s.shape, s.dtype)
  return jnp.zeros(s.shape, s.dtype, out_sharding=sharding)


def several_devices(x: Any) -> bool:
  """Whether ``x`` may live on several devices: this process has several,
  or the mesh in its type has (ahead-of-time compilation for a topology
  from a one-device host)."""
  if isinstance(x, QuantizedArray):
    x = x.codes
  try:
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  except (TypeError, AttributeError):
    mesh = None
  size = 1 if mesh is None or mesh.empty else mesh.size
  return jax.device_count() > 1 or size > 1


def spec_axes(specs: Any) -> tuple[str, ...]:
  """The mesh axes the ``PartitionSpec``s name, in order of appearance."""
  names: list[str] = []
  for spec in specs:
    for entry in spec:
      for name in entry if isinstance(entry, tuple) else (entry,):
        if name is not None and name not in names:
          names.append(name)
  return tuple(names)
