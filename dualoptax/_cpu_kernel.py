"""A fused, single-pass CPU kernel for the multi-objective step (numba + XLA FFI).

XLA:CPU has no multi-output fusion: it writes each of a leaf's outputs (update, new
delta moments, new base moments) in its own loop, each re-reading its inputs, and
copies the base moments because they are read after being overwritten in place
(about 20 array passes against AdamW's 10; benchmarks/RESULTS.md). This module
compiles one loop per variant with numba that reads every input once and writes every
output once, and calls it from XLA as a typed FFI custom call whose moment outputs
alias their inputs (updated in place, no copies).

Variants are keyed by (DualOptim+ or DualOptim, number of present objectives,
stable, weight decay on/off, float32/float64) and compiled on first use (one to two
seconds each, once per process). The kernel:

* reads and writes the moments through the *output* buffers, which XLA guarantees
  are the (aliased) input buffers: this keeps the loop free of the input/output
  overlap that would stop LLVM from vectorizing it;
* takes the non-finite flag as an input and, when it is 0, writes a zero update and
  leaves every moment untouched (the skipped step), so no ``lax.cond`` is needed;
* runs multi-threaded (numba ``prange``) on leaves of at least ``_PARALLEL_MIN``
  elements when a thread-safe numba threading layer (TBB or OpenMP) is available,
  single-threaded otherwise.

The XLA FFI handler ABI (``xla/ffi/api/c_api.h``, shipped with jaxlib) is decoded
here field by field; it is versioned and stable (XLA keeps old versions for at
least 12 months). The element-wise math is the same as ``_engine``'s XLA path.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Leaves at least this large use all cores; below it a thread launch costs more
# than it saves.
_PARALLEL_MIN = 1 << 17

# Offsets (in 8-byte words, LP64) into the structs of xla/ffi/api/c_api.h.
_FRAME_WORDS = 22           # XLA_FFI_CallFrame (first 22 words cover args/rets)
_FRAME_EXTENSION = 1        # extension_start
_FRAME_STAGE = 4            # stage (int32; 3 == EXECUTE)
_FRAME_ARGS_SIZE, _FRAME_ARGS = 7, 9      # args.size, args.args
_FRAME_RETS_SIZE, _FRAME_RETS = 12, 14    # rets.size, rets.rets
_BUFFER_DATA, _BUFFER_RANK, _BUFFER_DIMS = 3, 4, 5   # XLA_FFI_Buffer
_BUFFER_DTYPE = 2
_DTYPE_F32, _DTYPE_F64 = 11, 12           # XLA_FFI_DataType
_STAGE_EXECUTE = 3
_EXTENSION_METADATA = 1
_FFI_API_MINOR = 3          # XLA_FFI_API_MINOR of the header this decodes

# Layout of the scalar vector passed to every call (the leaf dtype).
_FINITE, _B1, _B2, _BB1, _BB2, _EPS, _WD, _RB1, _RB2 = range(9)
_PER_OBJECTIVE = 9          # then, per present objective: r1_k, r2_k, coef_k


class Variant(NamedTuple):
  """What a compiled kernel is specialised on."""
  base: bool        # DualOptim+ (True) or DualOptim (False)
  objectives: int   # number of objectives present in the call
  stable: bool
  decay: bool
  dtype: str        # "float32" or "float64"


def numba_available() -> bool:
  return importlib.util.find_spec("numba") is not None


def auto_applies() -> bool:
  """Whether ``implementation=None`` may pick a kernel at all: numba is installed
  and the process has one device (sharded operands would be gathered around a
  custom call). The per-call dtype checks come on top."""
  return numba_available() and jax.device_count() == 1


def supported_dtype(dtype: Any) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def _thread_safe_layer() -> bool:
  """Whether numba can run parallel loops launched from several threads at once."""
  for module in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
    try:
      importlib.import_module(module)
      return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
      continue
  return False


def _scalar_lines(v: Variant, dtype: str) -> list[str]:
  """Unpacks the scalar vector ``s`` (see the layout constants)."""
  lines = [
      f"  one = np.{dtype}(1)",
      "  b1 = s[%d]; b2 = s[%d]; eps = s[%d]; wd = s[%d]" % (_B1, _B2, _EPS, _WD),
      "  bb1 = s[%d]; bb2 = s[%d]; rB1 = s[%d]; rB2 = s[%d]" % (_BB1, _BB2, _RB1,
                                                               _RB2),
  ]
  for i in range(v.objectives):
    o = _PER_OBJECTIVE + 3 * i
    lines.append(f"  r1_{i} = s[{o}]; r2_{i} = s[{o + 1}]; coef{i} = s[{o + 2}]")
  return lines


def element_math(v: Variant, old: dict[str, str], grad: list[str],
                 param: str) -> list[str]:
  """Statements computing one element's step (the math of ``_engine``).

  Args:
    v: the variant.
    old: expression of each old moment, keyed ``m0, v0, ..., mB, vB``.
    grad: expression of each present objective's gradient.
    param: expression of the parameter (read only with weight decay).

  Returns:
    Statements that leave the new moments in ``mn0, vn0, ..., mBn, vBn`` and the
    update in ``uval``.
  """
  k = range(v.objectives)
  body = []
  if v.base:
    body += [f"mhB = {old['mB']} * rB1", f"vhB = {old['vB']} * rB2"]
  if v.decay:
    body.append(f"pj = {param}")
  for i in k:
    body.append(f"gj{i} = {grad[i]}")
    if v.base:
      body += [
          f"mn{i} = b1 * {old[f'm{i}']} + (one - b1) * (gj{i} - mhB)",
          f"vn{i} = b2 * {old[f'v{i}']} + (one - b2) * (gj{i} * gj{i} - vhB)",
          f"num = mn{i} * r1_{i} + mhB",
          f"sec = abs(vn{i} * r2_{i} + vhB)",
      ]
    else:
      body += [
          f"mn{i} = b1 * {old[f'm{i}']} + (one - b1) * gj{i}",
          f"vn{i} = b2 * {old[f'v{i}']} + (one - b2) * gj{i} * gj{i}",
          f"num = mn{i} * r1_{i}",
          f"sec = vn{i} * r2_{i}",
      ]
    if v.stable:
      body.append("sec = max(sec, num * num)")
    body.append("d = num / (np.sqrt(sec) + eps)")
    if v.decay:
      body.append("d = d + wd * pj")
    body.append(f"t{i} = coef{i} * d")
  body.append("uval = " + " + ".join(f"t{i}" for i in k))
  if v.base:
    n = v.objectives
    gsum = " + ".join(f"gj{i}" for i in k)
    g2sum = " + ".join(f"gj{i} * gj{i}" for i in k)
    body += [
        f"gm = ({gsum}) / np.{v.dtype}({n})" if n > 1 else "gm = gj0",
        f"g2m = ({g2sum}) / np.{v.dtype}({n})" if n > 1 else "g2m = gj0 * gj0",
        f"mBn = bb1 * {old['mB']} + (one - bb1) * gm",
        f"vBn = bb2 * {old['vB']} + (one - bb2) * g2m",
    ]
  return body


def _loop_source(v: Variant, parallel: bool) -> str:
  """numba source of the element loop for one variant (generated: K is static)."""
  k = range(v.objectives)
  # The update overwrites the first gradient in place (aliased buffers), so the
  # loop reads g0 through ``u``: one array, no overlap check to defeat vectorizing.
  grads = [f"g{i}" for i in k][1:]
  moments = [f"m{i}, v{i}" for i in k]
  args = ["s", *grads, "p", "u", *moments, "mB", "vB"]
  lines = [f"@numba.njit(parallel={parallel}, error_model='numpy')",
           f"def loop({', '.join(args)}):", *_scalar_lines(v, v.dtype)]
  rng = "numba.prange" if parallel else "range"
  lines.append(f"  for j in {rng}(u.size):")
  old = {f"{m}{i}": f"{m}{i}[j]" for i in k for m in ("m", "v")}
  old.update(mB="mB[j]", vB="vB[j]")
  body = element_math(v, old, ["u[j]"] + [f"g{i}[j]" for i in k][1:], "p[j]")
  for i in k:
    body += [f"m{i}[j] = mn{i}", f"v{i}[j] = vn{i}"]
  body.append("u[j] = uval")
  if v.base:
    body += ["mB[j] = mBn", "vB[j] = vBn"]
  lines += ["    " + b for b in body]
  return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def _ffi_helpers():
  """numba helpers that read the FFI structs (compiled once)."""
  import numba  # pylint: disable=import-outside-toplevel
  from numba import types  # pylint: disable=import-outside-toplevel
  from numba.core import cgutils  # pylint: disable=import-outside-toplevel
  from numba.extending import intrinsic  # pylint: disable=import-outside-toplevel

  @intrinsic
  def as_ptr(typingctx, addr):  # pylint: disable=unused-argument
    def codegen(context, builder, signature, args):
      return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen

  @numba.njit(inline="always")
  def words(addr, n):
    return numba.carray(as_ptr(addr), (n,), dtype=np.int64)

  @numba.njit(inline="always")
  def answer_metadata(frame):
    """Fills XLA's metadata query (API version); True if this call was one."""
    ext = frame[_FRAME_EXTENSION]
    if ext == 0:
      return False
    e = words(ext, 4)
    if (e[1] & 0xFFFFFFFF) != _EXTENSION_METADATA:
      return False
    md = e[3]
    md64 = words(md, 6)
    md32 = numba.carray(as_ptr(md), (12,), dtype=np.int32)
    md64[1] = 24            # api_version.struct_size
    md64[2] = 0             # api_version.extension_start
    md32[6] = 0             # api_version.major_version
    md32[7] = _FFI_API_MINOR
    md32[8] = 0             # traits
    md64[5] = 0             # state_type_id
    return True

  @numba.njit(inline="always")
  def is_execute(frame):
    """Answers XLA's metadata query; True only for the EXECUTE stage (the call that
    should run), False for the query and every other stage."""
    if answer_metadata(frame):
      return False
    return (frame[_FRAME_STAGE] & 0xFFFFFFFF) == _STAGE_EXECUTE

  @numba.njit(inline="always")
  def buffer_size(addr):
    b = words(addr, 6)
    n = 1
    if b[_BUFFER_RANK] > 0:
      dims = words(b[_BUFFER_DIMS], b[_BUFFER_RANK])
      for i in range(b[_BUFFER_RANK]):
        n *= dims[i]
    return n

  @numba.njit(inline="always")
  def buffer(addr, n, dtype):
    return numba.carray(as_ptr(words(addr, 6)[_BUFFER_DATA]), (n,), dtype=dtype)

  return numba, types, as_ptr, words, is_execute, buffer_size, buffer


def handler_source(v: Variant, call: str, setup: str = "") -> str:
  """numba source of an FFI handler that runs ``loop(<call>)`` on EXECUTE.

  Shared by the generated handlers: answers XLA's metadata query and ignores other
  stages (``is_execute``, as the all-finite handler does), binds ``args``, ``rets``, ``dt`` (the leaf dtype), ``n`` (the update's
  size), the scalar vector ``s`` and the update ``u`` (the first result); on a
  skipped call (``s[_FINITE] == 0``) writes a zero update and returns, leaving every
  aliased moment untouched. ``setup`` (indented lines) runs before the loop call.
  """
  return f"""
@numba.cfunc(types.voidptr(types.voidptr), error_model='numpy')
def handler(frame_ptr):
  frame = numba.carray(frame_ptr, ({_FRAME_WORDS},), dtype=np.int64)
  if not is_execute(frame):
    return as_ptr(0)
  args = words(frame[{_FRAME_ARGS}], frame[{_FRAME_ARGS_SIZE}])
  rets = words(frame[{_FRAME_RETS}], frame[{_FRAME_RETS_SIZE}])
  dt = np.{v.dtype}
  n = buffer_size(rets[0])
  s = buffer(args[0], {_PER_OBJECTIVE + 3 * v.objectives}, dt)
  u = buffer(rets[0], n, dt)
  if s[{_FINITE}] == 0:
    for j in range(n):   # the skipped step: zero update, moments untouched
      u[j] = 0
    return as_ptr(0)
{setup}  if n >= {_PARALLEL_MIN}:
    parallel_loop({call})
  else:
    serial_loop({call})
  return as_ptr(0)
"""


def _handler_source(v: Variant) -> str:
  """The handler of the float kernel: unpacks the buffers and calls the loop."""
  k = v.objectives
  # Inputs: s, g_1..g_{K-1}, p (if decay), then the aliased g_0 and moments.
  # Outputs: u (in g_0's buffer), m_0, v_0, ..., (mB, vB).
  grads = [f"buffer(args[{1 + i}], n, dt)" for i in range(k - 1)]
  p = f"buffer(args[{k}], n, dt)" if v.decay else "u"
  moments = [f"buffer(rets[{1 + i}], n, dt)" for i in range(2 * k)]
  base = ([f"buffer(rets[{1 + 2 * k}], n, dt)", f"buffer(rets[{2 + 2 * k}], n, dt)"]
          if v.base else ["u", "u"])
  return handler_source(v, ", ".join(["s", *grads, p, "u", *moments, *base]))


def build(name: str, v: Variant, loop_source, handler_code: str,
          **namespace) -> str:
  """Compiles a generated loop (parallel and serial) and its handler, registers the
  handler as the CPU FFI target ``name`` and returns ``name``.

  Args:
    name: the FFI target name.
    v: the variant (labels the generated code in tracebacks).
    loop_source: ``parallel -> source`` of a function named ``loop``.
    handler_code: source of a cfunc named ``handler`` that calls
      ``parallel_loop`` or ``serial_loop``.
    **namespace: extra globals of the generated code.
  """
  numba, types, as_ptr, words, is_execute, buffer_size, buffer = _ffi_helpers()
  namespace.update(numba=numba, np=np, types=types, as_ptr=as_ptr, words=words,
                   is_execute=is_execute, buffer_size=buffer_size, buffer=buffer)
  loops = {}
  for parallel in (True, False):
    scope = dict(namespace)
    exec(compile(loop_source(parallel and _thread_safe_layer()),  # pylint: disable=exec-used
                 f"<{name} loop {v}>", "exec"), scope)
    loops[parallel] = scope["loop"]
  scope = dict(namespace, parallel_loop=loops[True], serial_loop=loops[False])
  exec(compile(handler_code, f"<{name} handler {v}>", "exec"), scope)  # pylint: disable=exec-used
  handler = scope["handler"]
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address),
                              platform="cpu")
  _KEEP_ALIVE.append(handler)
  return name


@functools.lru_cache(maxsize=None)
def target(v: Variant) -> str:
  """Compiles (once) and registers the kernel of ``v``; returns its FFI name."""
  return build("dualoptax_" + "_".join(str(x) for x in v), v,
               lambda parallel: _loop_source(v, parallel), _handler_source(v))


@functools.lru_cache(maxsize=None)
def finite_target() -> str:
  """Registers (once) the all-finite check; returns its FFI name.

  Inputs: any number of float32/float64 arrays; output: an int32 scalar, 1 when
  every element of every input is finite. ``sum(x * 0)`` is 0 for finite data and
  NaN otherwise, in any summation order, so the loop may reassociate (vectorize).
  """
  numba, types, as_ptr, words, is_execute, buffer_size, buffer = _ffi_helpers()
  parallel = _thread_safe_layer()

  def make_sum(par):
    @numba.njit(parallel=par, error_model="numpy", fastmath={"reassoc"})
    def zero_sum(x):
      acc = x.dtype.type(0)
      for j in numba.prange(x.size):
        acc += x[j] * 0
      return acc
    return zero_sum

  par_sum, ser_sum = make_sum(parallel), make_sum(False)

  @numba.njit(inline="always")
  def finite(x):
    total = par_sum(x) if x.size >= _PARALLEL_MIN else ser_sum(x)
    return total == 0

  @numba.cfunc(types.voidptr(types.voidptr), error_model="numpy")
  def handler(frame_ptr):
    frame = numba.carray(frame_ptr, (_FRAME_WORDS,), dtype=np.int64)
    if not is_execute(frame):
      return as_ptr(0)
    args = words(frame[_FRAME_ARGS], frame[_FRAME_ARGS_SIZE])
    rets = words(frame[_FRAME_RETS], frame[_FRAME_RETS_SIZE])
    out = buffer(rets[0], 1, np.int32)
    ok = True
    for i in range(frame[_FRAME_ARGS_SIZE]):
      n = buffer_size(args[i])
      if (words(args[i], 6)[_BUFFER_DTYPE] & 0xFFFFFFFF) == _DTYPE_F64:
        ok = finite(buffer(args[i], n, np.float64))
      else:
        ok = finite(buffer(args[i], n, np.float32))
      if not ok:
        break
    out[0] = 1 if ok else 0
    return as_ptr(0)

  name = "dualoptax_all_finite"
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address),
                              platform="cpu")
  _KEEP_ALIVE.append(handler)
  return name


def all_finite(arrays: Sequence[jax.Array]) -> jax.Array:
  """One bool: every element of ``arrays`` (float32/float64) is finite."""
  call = jax.ffi.ffi_call(finite_target(), jax.ShapeDtypeStruct((), jnp.int32),
                          vmap_method="sequential")
  return call(*arrays) == 1


# Compiled handlers must outlive every executable that calls them.
_KEEP_ALIVE: list[Any] = []


def leaf_step(v: Variant, scalars: jax.Array, grads: Sequence[jax.Array],
              param: jax.Array | None, moments: Sequence[jax.Array],
              base: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array],
                                                  list[jax.Array]]:
  """One leaf through the fused kernel.

  Args:
    v: the variant (must match the arguments).
    scalars: the per-call scalar vector (see the layout constants), leaf dtype.
    grads: the present objectives' gradients of this leaf.
    param: the parameter leaf (read only when ``v.decay``).
    moments: ``[m_0, v_0, m_1, v_1, ...]`` of the present objectives.
    base: ``[m_B, v_B]`` (DualOptim+) or ``[]``.

  Returns:
    ``(update, new_moments, new_base)``. The update is written over the first
    gradient's buffer: free when the gradients are dead after the update (as in
    a train step), one copy made by XLA otherwise.
  """
  inputs = [scalars, *grads[1:]] + ([param] if v.decay else [])
  first_alias = len(inputs)
  aliased = [grads[0], *moments, *base]
  shape = jax.ShapeDtypeStruct(grads[0].shape, grads[0].dtype)
  call = jax.ffi.ffi_call(
      target(v), [shape] * len(aliased),
      input_output_aliases={first_alias + i: i for i in range(len(aliased))},
      vmap_method="sequential")
  out = call(*inputs, *aliased)
  n_mom = len(moments)
  return out[0], list(out[1:1 + n_mom]), list(out[1 + n_mom:])
