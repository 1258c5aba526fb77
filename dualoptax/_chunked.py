"""Runs an element-wise update over 8-bit state one bounded chunk at a time.

:func:`apply_in_chunks` takes a function of flat arrays (the inner optimizer's
update) and inputs some of which are :class:`~dualoptax.QuantizedArray`. It
traces the function once to a jaxpr and reads from it which outputs depend on
which inputs. Inputs and outputs that depend on each other form a *group*
(typically: one parameter's gradients, state and update). A group whose
equations are all element-wise on arrays of one shape runs chunk by chunk in a
``lax.fori_loop``: each iteration decodes a slice of rows of every 8-bit input,
evaluates the group's equations on it, re-encodes the new moments and writes
codes, absmax and update back in place. Groups with the same signature (same
shape, equations and layouts: a model's layers) share one loop, their chunks
stacked. Loops run one after the other, so at most one (stacked) chunk of
decoded float32 moments exists at any moment of the step, by construction.

Chunks are strided sets of rows (rows ``i, i + K, i + 2K, ...`` of the leading
axis): viewed as ``[R / K, K, ...]`` the leading axis keeps its sharding, so a
sharded update needs no collective. Blocks run along the last axis and never
cross a row, so a chunk's codes and absmax are those of a whole-array pass up
to the float32 rounding of differently fused loops.

What is not element-wise (a global-norm clip or a finiteness check over all
leaves, a per-leaf norm, control flow, an array the update closes over) stays
correct: those groups are decoded whole, and a warning names them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from dualoptax import _kernel, _sharding
from dualoptax import quantization as _q
from dualoptax.quantization import QuantizedArray

# Call-like primitives whose bodies are inlined, so that each group can take
# just its own equations out of them.
_CALL_BODIES = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "checkpoint": "jaxpr",
  "remat": "jaxpr",
}

# Primitives that map elements to elements (same position in and out).
_ELEMENTWISE = frozenset(
  """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp
    exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log log1p
    logistic lt max min mul ne neg nextafter not or population_count pow real
    reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square sub tan tanh xor""".split()
)


def _read(env: dict, v: Any) -> Any:
  return v.val if isinstance(v, jex_core.Literal) else env[v]


def _bind(eqn, invals, params=None):
  params = eqn.primitive.get_bind_params(
    eqn.params if params is None else params
  )
  subfuns = ()
  if isinstance(params, tuple):  # jax < 0.7 returned (subfuns, params)
    subfuns, params = params
  # The equation's context, but the mesh of where it is evaluated now: a
  # kernel per shard evaluates it inside a shard_map (manual axes), not
  # under the mesh it was traced under.
  here = jax.sharding.get_abstract_mesh()
  with eqn.ctx.manager, jax.sharding.use_abstract_mesh(here):
    outs = eqn.primitive.bind(*subfuns, *invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _eval_inlined(jaxpr, consts, args):
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    key = _CALL_BODIES.get(eqn.primitive.name)
    body = eqn.params.get(key) if key else None
    if isinstance(body, jex_core.ClosedJaxpr):
      outs = _eval_inlined(body.jaxpr, body.consts, invals)
    elif isinstance(body, jex_core.Jaxpr):
      outs = _eval_inlined(body, (), invals)
    else:
      outs = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [_read(env, v) for v in jaxpr.outvars]


def _flat_jaxpr(fn: Callable, avals: Sequence[jax.ShapeDtypeStruct]):
  """The jaxpr of ``fn`` with every call-like primitive inlined."""
  closed = jax.make_jaxpr(fn)(*avals)
  return jax.make_jaxpr(
    lambda *a: _eval_inlined(closed.jaxpr, closed.consts, a)
  )(*avals)


def _aval_shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


# ---------------------------------------------------------------------------
# Which outputs depend on which inputs.
# ---------------------------------------------------------------------------
def _output_dependencies(jaxpr, tracked: Sequence[bool]) -> list[int]:
  """Per output, a bitmask of the tracked inputs it depends on."""
  dep = {
    v: (1 << i) if t else 0
    for i, (v, t) in enumerate(zip(jaxpr.invars, tracked))
  }
  for eqn in jaxpr.eqns:
    d = 0
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        d |= dep.get(v, 0)
    for v in eqn.outvars:
      dep[v] = d
  return [
    0 if isinstance(v, jex_core.Literal) else dep.get(v, 0)
    for v in jaxpr.outvars
  ]


def _bits(mask: int):
  i = 0
  while mask:
    if mask & 1:
      yield i
    mask >>= 1
    i += 1


def _components(n_in: int, out_deps: Sequence[int]):
  """Connected components over inputs and outputs (output ``o`` is node
  ``n_in + o``), joined by dependency. Returns a root per node."""
  parent = list(range(n_in + len(out_deps)))

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for o, mask in enumerate(out_deps):
    for i in _bits(mask):
      parent[find(n_in + o)] = find(i)
  return [find(x) for x in range(len(parent))]


def _group_equations(jaxpr, out_group: Sequence[int], n_groups: int):
  """Per group, the indices of the equations its outputs need, in order; and
  per input variable, the bitmask of groups that read it."""
  need: dict = {}
  for o, v in enumerate(jaxpr.outvars):
    if not isinstance(v, jex_core.Literal):
      need[v] = need.get(v, 0) | (1 << out_group[o])
  marks = [0] * len(jaxpr.eqns)
  for k in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[k]
    g = 0
    for v in eqn.outvars:
      g |= need.get(v, 0)
    marks[k] = g
    if g:
      for v in eqn.invars:
        if not isinstance(v, jex_core.Literal):
          need[v] = need.get(v, 0) | g
  lists = [[] for _ in range(n_groups)]
  for k, g in enumerate(marks):
    for b in _bits(g):
      lists[b].append(k)
  return lists, need


def _is_elementwise(jaxpr, eqn_ids, shape) -> bool:
  """Whether every array equation maps elements of ``shape`` to elements of
  ``shape`` (scalars may be broadcast), reading no array closed over by the
  update (a constant is whole, not a chunk)."""
  constvars = set(jaxpr.constvars)
  for k in eqn_ids:
    eqn = jaxpr.eqns[k]
    if any(
      not isinstance(v, jex_core.Literal) and v in constvars and _aval_shape(v)
      for v in eqn.invars
    ):
      return False
    shapes = [_aval_shape(v) for v in (*eqn.invars, *eqn.outvars)]
    arrays = [s for s in shapes if s != ()]
    if not arrays:
      continue  # scalar arithmetic (counts, bias corrections, schedules)
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
      if _aval_shape(eqn.invars[0]) not in ((), tuple(shape)):
        return False
    elif name not in _ELEMENTWISE:
      return False
    if any(s != tuple(shape) for s in arrays):
      return False
  return True


def _eval_equations(
  jaxpr, consts, env: dict, eqn_ids, outvars, shape=None
) -> list:
  """Evaluates equations ``eqn_ids`` of ``jaxpr`` on ``env``.

  With ``shape``, the equations are element-wise ones traced on arrays of
  another shape (a leaf's), evaluated on arrays of ``shape`` (a chunk's): only
  a broadcast names its output shape, so it is rebound with ``shape``. This
  spares tracing the update a second time at chunk shapes.
  """
  env = {**dict(zip(jaxpr.constvars, consts)), **env}
  for k in eqn_ids:
    eqn = jaxpr.eqns[k]
    params = None
    if shape is not None and eqn.primitive.name == "broadcast_in_dim":
      params = {**eqn.params, "shape": tuple(shape)}
    for v, x in zip(
      eqn.outvars, _bind(eqn, [_read(env, v) for v in eqn.invars], params)
    ):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [_read(env, v) for v in outvars]


def _signature(jaxpr, eqn_ids, local_inputs, outputs, invar_index) -> tuple:
  """What a group computes, up to which leaf it reads: groups with equal
  signatures run the same equations on their own inputs, so they can be
  evaluated together on stacked chunks."""
  role = {jaxpr.invars[i]: ("in", p) for p, i in enumerate(local_inputs)}
  const_index = {v: i for i, v in enumerate(jaxpr.constvars)}
  sig = []
  for k in eqn_ids:
    eqn = jaxpr.eqns[k]
    ins = []
    for v in eqn.invars:
      if isinstance(v, jex_core.Literal):
        ins.append(("lit", repr(v.val), str(v.aval)))
      elif v in role:
        ins.append(role[v])
      elif v in invar_index:
        ins.append(("global", invar_index[v]))
      else:
        ins.append(("const", const_index.get(v)))
    for v in eqn.outvars:
      role[v] = ("local", len(role))
    params = tuple(sorted((key, repr(val)) for key, val in eqn.params.items()))
    sig.append(
      (
        eqn.primitive.name,
        tuple(ins),
        tuple(str(v.aval) for v in eqn.outvars),
        params,
      )
    )
  outs = tuple(role.get(jaxpr.outvars[o]) for o in outputs)
  return tuple(sig), outs


# ---------------------------------------------------------------------------
# Chunk plan.
# ---------------------------------------------------------------------------
def _block_groups(xs) -> int:
  """The strided block groups ``G`` along the leading axis that chunks must keep
  whole (0: none): 8-bit leaves whose blocks span axis 0 (``rows > 1``)."""
  g = 0
  for x in xs:
    if isinstance(x, QuantizedArray) and x.rows > 1 and x.shape:
      j = _q._split_axis(tuple(x.shape), x.block_size, x.rows)  # pylint: disable=protected-access
      if j == 0:
        g = math.gcd(g, x.shape[0] // x.rows)
  return g


def num_chunks(
  shape: Sequence[int], chunk_size: int, devices: int, divides: int = 0
) -> int:
  """How many strided row chunks a leaf of ``shape`` is split into.

  The smallest ``K >= 2`` dividing ``R / gcd(R, devices)`` (``R`` the leading
  axis) whose chunks hold at most ``chunk_size`` values; the largest such
  divisor when none is that small; 1 when there is none. Keeping ``R / K`` a
  multiple of ``gcd(R, devices)`` keeps every shard of the leading axis a whole
  number of chunk rows. Even a leaf that fits in one chunk is split in two: a
  loop of one iteration is inlined by XLA, and a loop is what keeps the leaf's
  temporaries from overlapping other leaves' (a backend's scheduler may
  otherwise run every leaf's step before any leaf's encoding).
  With ``divides`` (the ``G`` of 8-bit blocks spanning the leading axis in
  ``G`` strided groups), ``K`` also divides ``G``, so a chunk holds whole
  blocks.
  """
  if len(shape) < 2:
    return 1
  rows = int(shape[0])
  row = math.prod(shape[1:])
  free = rows // math.gcd(rows, max(int(devices), 1))
  if divides:  # K must also divide the leading-axis block groups
    free = math.gcd(free, int(divides))
  best = 1
  for k in range(2, free + 1):
    if free % k == 0:
      best = k
      if (rows // k) * row <= chunk_size:
        return k
  return best


def _view(x, k: int):
  return x if k == 1 else x.reshape(x.shape[0] // k, k, *x.shape[1:])


def _unview(x, k: int):
  return x if k == 1 else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _take(x, i, k: int):
  return x if k == 1 else jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False)


def _put(x, chunk, i, k: int):
  if k == 1:
    return chunk.astype(x.dtype)
  return jax.lax.dynamic_update_index_in_dim(x, chunk.astype(x.dtype), i, 1)


def _chunk_shape(shape, k: int):
  return (shape[0] // k, *shape[1:]) if k > 1 else tuple(shape)


def _decode(codes, absmax, like: QuantizedArray, shape):
  return _q.dequantize_blockwise(
    QuantizedArray(
      codes,
      absmax,
      tuple(shape),
      like.dtype,
      like.signed,
      like.pad,
      like.block_size,
      like.rows,
    )
  )


def _encode(x, like: QuantizedArray) -> QuantizedArray:
  return _q._quantize_with_layout(  # pylint: disable=protected-access
    x, like.signed, like.block_size, like.pad, like.rows
  )


def _aval(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype))


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------
class _Group(NamedTuple):
  inputs: list  # tracked (array) input indices, ascending
  outputs: list  # output indices, ascending
  shape: tuple


def _layout_key(x) -> tuple:
  if isinstance(x, QuantizedArray):
    return ("q", x.dtype, x.signed, x.pad, x.block_size, x.rows)
  return ("a",)


def apply_in_chunks(
  fn: Callable[..., list],
  inputs: Sequence[Any],
  state_slots: dict[int, int],
  *,
  chunk_size: int,
  describe: Callable[[int], str] = str,
  reusable: frozenset = frozenset(),
  kernel: str = "xla",
  keep: Optional[jax.Array] = None,
  reread: frozenset = frozenset(),
) -> list:
  """Evaluates ``fn`` on decoded ``inputs``, group by group, chunk by chunk.

  Groups that compute the same equations on leaves of the same shape (the
  layers of a model) share one loop: each iteration stacks their chunks and
  evaluates the equations once.

  Args:
    fn: a function of flat arrays returning a flat list of arrays.
    inputs: its arguments; a :class:`QuantizedArray` stands for its decoded
      array.
    state_slots: ``{output index: input index}`` for outputs that are the new
      value of a state input. Such an output of a quantized input is returned
      re-encoded with that input's layout, or the input itself where ``fn``
      returns it unchanged.
    chunk_size: most values decoded at once (per loop iteration).
    describe: names an input index in warnings.
    reusable: inputs (the incoming gradients) whose buffers an output that
      is not state may start in: each loop's update starts as one of its
      group's, read from that carry chunk by chunk before it is overwritten,
      so XLA can write the update into the gradient's buffer where the
      gradient is dead after the step. Empty under a conditional, whose
      operands XLA copies instead.
    kernel: ``"xla"``: loops; ``"pallas"``: each group whose leaf layout
      allows it runs as a fused Pallas kernel over tiles of rows (see
      :mod:`dualoptax._kernel`) instead of a loop over chunks, compiled on
      TPU, interpreted elsewhere; ``"auto"``: the same, but a leaf under
      several devices whose type does not carry its sharding keeps the
      loops. Where it does (a mesh with explicit axes), the kernel runs per
      shard.
    keep: a traced bool, or None (always True). Where False, every state
      output is its input as it was (8-bit codes and absmax bit for bit) and
      every other output is zeros: a skipped step without a conditional. A
      kernel selects in VMEM, before it writes; other outputs select after.
    reread: inputs the step reads again after this update (the parameters,
      read by ``optax.apply_updates``): a kernel leaves them for XLA to
      place, and pins its other operands in HBM (``_kernel.group_kernel``).

  Returns:
    ``fn``'s outputs, quantized where their slot is.
  """
  n_in = len(inputs)
  is_q = [isinstance(x, QuantizedArray) for x in inputs]
  full = [_aval(x) for x in inputs]
  j1 = _flat_jaxpr(fn, full)
  n_out = len(j1.jaxpr.outvars)
  q_out = {o: inputs[i] for o, i in state_slots.items() if is_q[i]}
  out_avals = [_aval(v.aval) for v in j1.jaxpr.outvars]
  devices = jax.device_count()

  # Groups: connected inputs and outputs. Scalars are shared by all and join
  # nothing (counts, hyperparameters).
  tracked = [len(a.shape) > 0 for a in full]
  roots = _components(n_in, _output_dependencies(j1.jaxpr, tracked))
  members: dict[int, list[int]] = {}
  for node, root in enumerate(roots):
    members.setdefault(root, []).append(node)
  candidates = []
  for nodes in members.values():
    ins = [x for x in nodes if x < n_in and tracked[x]]
    outs = [x - n_in for x in nodes if x >= n_in]
    quantized = any(is_q[i] for i in ins) or any(o in q_out for o in outs)
    # A float32-only group (state the wrapper keeps in float32) joins the
    # groups only to run as a kernel of its own (see _run_kernels).
    if outs and (
      quantized
      or (
        kernel != "xla"
        and ins
        and _whole_leaf_group([inputs[i] for i in ins], kernel)
      )
    ):
      shapes = {tuple(full[i].shape) for i in ins}
      shapes |= {tuple(out_avals[o].shape) for o in outs}
      candidates.append(
        _Group(ins, outs, shapes.pop() if len(shapes) == 1 else None)
      )

  def plan(jaxpr, groups):
    out_group = [0] * n_out
    for g, grp in enumerate(groups, start=1):
      for o in grp.outputs:
        out_group[o] = g
    eqns, need = _group_equations(jaxpr, out_group, len(groups) + 1)
    return out_group, eqns, need

  # A group's equations are those its outputs need, whatever else is grouped.
  _, cand_eqns, _ = plan(j1.jaxpr, candidates)
  groups, eqns1, coupled = [], [None], []
  for g, grp in enumerate(candidates, start=1):
    if grp.shape and _is_elementwise(j1.jaxpr, cand_eqns[g], grp.shape):
      groups.append(grp)
      eqns1.append(cand_eqns[g])
    else:
      coupled += [i for i in grp.inputs if is_q[i]]
  if coupled:
    warnings.warn(
      "quantize_state: the inner update is not element-wise per leaf for "
      f"{len(coupled)} quantized state leaves (e.g. "
      f"{', '.join(describe(i) for i in coupled[:3])}): a reduction across "
      "elements or leaves (a global-norm clip, a finiteness check), control "
      "flow, mixed shapes, or an array the update closes over. They are "
      "decoded whole at each step. Put such a transformation outside "
      "quantize_state to bound the step's memory.",
      stacklevel=4,
    )

  def buckets(jaxpr, eqns):
    invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
    found: dict = {}
    for g, grp in enumerate(groups, start=1):
      # Groups of one signature (a model's layers) share one loop: fewer
      # kernels to compile than a loop per leaf (benchmarks/RESULTS.md), at
      # the price of copying each chunk into the stack.
      key = (
        _signature(jaxpr, eqns[g], grp.inputs, grp.outputs, invar_index),
        grp.shape,
        tuple(_layout_key(inputs[i]) for i in grp.inputs),
        tuple(_layout_key(q_out.get(o)) for o in grp.outputs),
      )
      found.setdefault(key, []).append(g - 1)
    return list(found.values())

  # Chunk counts per bucket; each group's element-wise equations are then
  # evaluated on chunks (see _eval_equations).
  bucket_list = buckets(j1.jaxpr, eqns1)
  chunks = [1] * len(groups)
  for bucket in bucket_list:
    grp0 = groups[bucket[0]]
    k = num_chunks(
      grp0.shape,
      max(chunk_size // len(bucket), 1),
      devices,
      _block_groups(
        [inputs[i] for i in grp0.inputs]
        + [q_out[o] for o in grp0.outputs if o in q_out]
      ),
    )
    for g in bucket:
      chunks[g] = k
  jaxpr, consts = j1.jaxpr, j1.consts
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  out_group, eqns, need = plan(jaxpr, groups)

  def passthrough(o) -> Optional[int]:
    v = jaxpr.outvars[o]
    return None if isinstance(v, jex_core.Literal) else invar_index.get(v)

  used = [need.get(v, 0) for v in jaxpr.invars]

  results: list = [None] * n_out
  decoded_whole: dict[int, Any] = {}

  def whole(i):
    if i not in decoded_whole:
      decoded_whole[i] = (
        _q.dequantize_blockwise(inputs[i]) if is_q[i] else inputs[i]
      )
    return decoded_whole[i]

  def finish(o, value):
    return _encode(value, q_out[o]) if o in q_out else value

  def set_passthrough(o, i):
    results[o] = inputs[i] if state_slots.get(o) == i else finish(o, whole(i))

  # 1. Everything outside the groups, whole.
  rest = [o for o in range(n_out) if out_group[o] == 0]
  computed = [o for o in rest if passthrough(o) is None]
  values = _eval_equations(
    jaxpr,
    consts,
    {jaxpr.invars[i]: whole(i) for i in range(n_in) if used[i] & 1},
    eqns[0],
    [jaxpr.outvars[o] for o in computed],
  )
  for o, value in zip(computed, values):
    results[o] = finish(o, value)
  for o in rest:
    if passthrough(o) is not None:
      set_passthrough(o, passthrough(o))
  scalars = {jaxpr.invars[i]: inputs[i] for i in range(n_in) if not tracked[i]}
  fused: set = set()  # outputs a kernel wrote, its keep already applied

  # 2. Each bucket of same-signature groups: one loop over chunks.
  for bucket in bucket_list:
    _run_bucket(
      jaxpr,
      consts,
      [groups[g] for g in bucket],
      [eqns[g + 1] for g in bucket],
      chunks[bucket[0]],
      inputs,
      is_q,
      q_out,
      state_slots,
      out_avals,
      scalars,
      results,
      set_passthrough,
      passthrough,
      reusable,
      kernel,
      keep,
      fused,
      reread,
    )
  if keep is not None:
    for o in range(n_out):
      i = state_slots.get(o)
      if o not in fused and not (i is not None and results[o] is inputs[i]):
        results[o] = _kept(keep, results[o], None if i is None else inputs[i])
  return results


def _kept(keep, new, old):
  """``new`` where ``keep``, else ``old`` (zeros where ``old`` is None)."""
  if old is None:
    return jnp.where(keep, new, jnp.zeros_like(new))
  if isinstance(new, QuantizedArray):
    return QuantizedArray(
      jnp.where(keep, new.codes, old.codes),
      jnp.where(keep, new.absmax, old.absmax),
      *_meta(new),
    )
  return jnp.where(keep, new, old)


def _run_bucket(
  jaxpr,
  consts,
  groups,
  eqns,
  k,
  inputs,
  is_q,
  q_out,
  state_slots,
  out_avals,
  scalars,
  results,
  set_passthrough,
  passthrough,
  reusable,
  kernel="xla",
  keep=None,
  fused=None,
  reread=frozenset(),
):
  """Runs groups of one signature: a loop over ``k`` chunks, each iteration
  evaluating the first group's equations once on the stacked chunks of all."""
  carried = []
  for grp in groups:
    outs = []
    for o in grp.outputs:
      i = passthrough(o)
      if i is None:
        outs.append(o)
      else:
        set_passthrough(o, i)
    carried.append(outs)
  if not carried[0]:
    return
  template, n = groups[0], len(groups)
  shape = template.shape
  if kernel != "xla" and _run_kernels(
    jaxpr,
    consts,
    groups,
    eqns[0],
    carried,
    inputs,
    is_q,
    q_out,
    state_slots,
    scalars,
    results,
    keep,
    fused,
    kernel,
    reread,
  ):
    return
  if not any(is_q[i] for i in template.inputs) and not any(
    o in q_out for o in carried[0]
  ):
    # Float32 state only, where no kernel took it: whole, as outside groups.
    for grp, ids, outs in zip(groups, eqns, carried):
      env = {**scalars, **{jaxpr.invars[i]: inputs[i] for i in grp.inputs}}
      new = _eval_equations(
        jaxpr, consts, env, ids, [jaxpr.outvars[o] for o in outs]
      )
      for o, x in zip(outs, new):
        results[o] = x
    return
  cshape = _chunk_shape(shape, k)

  # Carry buffers start as the state they replace, so XLA updates the donated
  # state in place; a state input is read from its own carry. An update's
  # carry starts as one of the group's ``reusable`` gradients, read from that
  # carry too: chunk i is read before it is overwritten, and where the
  # gradient is dead after the step (computed in the same jit) XLA writes the
  # update into its buffer, not a new one.
  def fits(i, o) -> bool:
    return (
      tuple(inputs[i].shape) == tuple(shape)
      and jnp.dtype(inputs[i].dtype) == out_avals[o].dtype
    )

  init, sources = [], []
  for grp, outs in zip(groups, carried):
    source = {}
    for o in outs:
      i = state_slots.get(o)
      if o in q_out:
        source[i] = len(init)
        init += [inputs[i].codes, inputs[i].absmax]
        continue
      if i is None:
        i = next(
          (
            j
            for j in grp.inputs
            if j in reusable and j not in source and fits(j, o)
          ),
          None,
        )
      if i is not None and fits(i, o):
        source[i] = len(init)
        init.append(inputs[i])
      else:
        like = inputs[grp.inputs[0]]
        init.append(
          _sharding.zeros(
            _sharding.struct(
              shape, out_avals[o].dtype, like=getattr(like, "codes", like)
            )
          )
        )
    sources.append(source)
  invariant = [
    {i: inputs[i] for i in grp.inputs if i not in src}
    for grp, src in zip(groups, sources)
  ]
  views = [
    {
      i: (
        QuantizedArray(_view(x.codes, k), _view(x.absmax, k), *_meta(x))
        if is_q[i]
        else _view(x, k)
      )
      for i, x in inv.items()
    }
    for inv in invariant
  ]
  local = [jaxpr.invars[i] for i in template.inputs]
  outvars = [jaxpr.outvars[o] for o in carried[0]]
  new_shapes = [
    jax.ShapeDtypeStruct(((n,) if n > 1 else ()) + cshape, v.aval.dtype)
    for v in outvars
  ]

  def evaluate(*xs):
    return _eval_equations(
      jaxpr,
      consts,
      {**scalars, **dict(zip(local, xs))},
      eqns[0],
      outvars,
      cshape,
    )

  stacked_eval = jax.vmap(evaluate) if n > 1 else evaluate
  stack = (lambda xs: jnp.stack(xs)) if n > 1 else (lambda xs: xs[0])
  unstack = (lambda x, m: x[m]) if n > 1 else (lambda x, m: x)

  def body(step, carry):
    args = []
    for p in range(len(template.inputs)):
      raw = []
      for grp, src, view in zip(groups, sources, views):
        i = grp.inputs[p]
        if i in src:
          at = src[i]
          raw.append(
            (_take(carry[at], step, k), _take(carry[at + 1], step, k))
            if is_q[i]
            else _take(carry[at], step, k)
          )
        else:
          x = view[i]
          raw.append(
            (_take(x.codes, step, k), _take(x.absmax, step, k))
            if is_q[i]
            else _take(x, step, k)
          )
      i0 = template.inputs[p]
      if is_q[i0]:
        like = inputs[i0]
        args.append(
          _decode(
            stack([r[0] for r in raw]),
            stack([r[1] for r in raw]),
            like,
            ((n,) if n > 1 else ()) + cshape,
          )
        )
      else:
        args.append(stack(raw))
    if n > 1:
      # Materialize the stacked chunks: fused into the step, a concatenation
      # of n inputs multiplies the size of every kernel that reads it.
      args = jax.lax.optimization_barrier(args)
    # The new moments and updates are materialized once, not recomputed in
    # each encoder or member slice that reads them (see _materialized).
    new = _materialized(
      lambda: stacked_eval(*args), new_shapes, step, k > 1, like=args[0]
    )
    carry = list(carry)
    for q, o0 in enumerate(carried[0]):
      if o0 in q_out:
        enc = _encode_once(new[q], q_out[o0], step, n > 1 and k > 1)
      for m, outs in enumerate(carried):
        at = _carry_index(carried, q_out, m, q)
        if o0 in q_out:
          carry[at] = _put(carry[at], unstack(enc.codes, m), step, k)
          carry[at + 1] = _put(carry[at + 1], unstack(enc.absmax, m), step, k)
        else:
          carry[at] = _put(carry[at], unstack(new[q], m), step, k)
    return carry

  init = [_view(x, k) for x in init]
  final = body(0, init) if k == 1 else jax.lax.fori_loop(0, k, body, init)
  final = [_unview(x, k) for x in final]
  for m, outs in enumerate(carried):
    for q, o in enumerate(outs):
      at = _carry_index(carried, q_out, m, q)
      if o in q_out:
        results[o] = QuantizedArray(final[at], final[at + 1], *_meta(q_out[o]))
      else:
        results[o] = final[at]


def _whole_leaf_group(arrays: Sequence[Any], kernel: str) -> bool:
  """Whether a group of float32 arrays (no 8-bit operand) runs as a
  whole-leaf kernel: one shape, under a view a kernel takes, small enough
  (``_kernel.whole_leaf_values``). Others stay outside the groups."""
  view = _kernel.shard_view(arrays, kernel)
  return (
    view is not None
    and len({tuple(a.shape) for a in arrays}) == 1
    and all(
      not isinstance(a, QuantizedArray) and jnp.dtype(a.dtype) == jnp.float32
      for a in arrays
    )
    and _kernel.whole_leaf_values(tuple(view(arrays[0]).shape))
  )


def _run_kernels(
  jaxpr,
  consts,
  groups,
  eqn_ids,
  carried,
  inputs,
  is_q,
  q_out,
  state_slots,
  scalars,
  results,
  keep,
  fused,
  kernel: str,
  reread: frozenset = frozenset(),
) -> bool:
  """Runs each group of a bucket as one fused kernel (the template's
  equations on the member's inputs); False, with nothing written, where the
  leaf's layout or dtypes keep the bucket on the loop path.

  Where the arrays carry their sharding in their types (a mesh with explicit
  axes), the kernel is built for one shard and runs on every shard
  (``_kernel.on_shards``). Otherwise, under several devices, ``"auto"``
  keeps the loops: a custom call would gather sharded operands.
  """
  template = groups[0]
  first = inputs[template.inputs[0]]
  shard = _kernel.shard_view(
    [
      x
      for grp in groups
      for x in [inputs[i] for i in grp.inputs]
      + [q_out[o] for o in grp.outputs if o in q_out]
    ],
    kernel,
  )
  if shard is None:
    return False
  sharded = shard is _kernel.local_stand_in
  layouts = [shard(inputs[i]) for i in template.inputs if is_q[i]]
  layouts += [shard(q_out[o]) for o in carried[0] if o in q_out]
  shape = shard(first).shape if sharded else template.shape
  # No 8-bit operand: float32 state, one kernel over the whole leaf (which
  # whole_leaf_kernel declines, as None, where the leaf does not fit it).
  rows = _kernel.tile_rows(shape, layouts) if layouts else 0
  if rows is None:
    return False
  local = [jaxpr.invars[i] for i in template.inputs]
  outvars = [jaxpr.outvars[o] for o in carried[0]]
  done = []
  built: dict = {}  # one kernel per alias pattern (in practice one per bucket)
  for grp, outs in zip(groups, carried):
    # A state's codes, absmax or float32 value is updated in place. The
    # gradient is not taken over, unlike the loops' ``reusable`` carries:
    # XLA already writes ``params + update`` into the kernel's update buffer
    # (params donated), so taking a gradient's buffer saves nothing, and
    # costs a copy where the gradient is live after the step.
    aliases: dict = {}
    for q, o in enumerate(outs):
      i = state_slots.get(o)
      if i is not None and i in grp.inputs:
        aliases[grp.inputs.index(i)] = q
      elif i is not None and keep is not None:
        return False  # a skipped step would need this state's old value
    args = [inputs[i] for i in grp.inputs]
    out_like = [q_out.get(o) for o in outs]
    key = tuple(sorted(aliases.items()))
    if key not in built:
      # The group's equations and operands, then what each kernel adds.
      group = (jaxpr, consts, eqn_ids, local, [shard(a) for a in args])
      once = dict(
        shared=len(groups) > 1,
        reread=[p for p, i in enumerate(template.inputs) if i in reread],
      )
      built[key] = (
        _kernel.group_kernel(
          *group,
          outvars,
          [None if q is None else shard(q) for q in out_like],
          scalars,
          aliases,
          rows,
          _eval_equations,
          keep,
          **once,
        )
        if layouts
        else _kernel.whole_leaf_kernel(
          *group, outvars, scalars, aliases, _eval_equations, keep, **once
        )
      )
    if built[key] is None:
      return False
    if sharded:
      done.append(_kernel.on_shards(built[key], args, out_like))
    else:
      done.append(built[key].apply(built[key].scalars, args))
  for outs, new in zip(carried, done):
    for o, x in zip(outs, new):
      results[o] = x
      fused.add(o)
  return True


def _materialized(
  compute: Callable, shapes, step, materialize: bool, like: Any = None
):
  """``compute()``, its outputs written to buffers once.

  Where a stacked result is then sliced apart per member, XLA fuses the whole
  computation into each member's slice: one copy of the step's and encoder's
  kernels per leaf, and compile time that grows with the number of leaves
  (optimization barriers do not prevent this on XLA:CPU). The outputs of a
  conditional are buffers, so its branch runs once; the predicate is the loop
  index, known only at run time, and always true.
  """
  if not materialize:
    return compute()
  if _sharding.explicit(like) is not None:
    # Under a mesh with explicit axes the branches' types carry the sharding
    # (``like`` is an input of ``compute``), which ``shapes`` does not hold.
    shapes = jax.eval_shape(compute)
  return jax.lax.cond(
    step >= 0, compute, lambda: jax.tree.map(_sharding.zeros, shapes)
  )


def _encode_once(x, like: QuantizedArray, step, materialize: bool):
  *lead, n = x.shape
  n += like.pad
  shapes = QuantizedArray(
    jax.ShapeDtypeStruct((*lead, n), jnp.uint8),
    jax.ShapeDtypeStruct(
      _q.absmax_shape(tuple(x.shape), like.block_size, like.pad, like.rows),
      jnp.float32,
    ),
    tuple(x.shape),
    jnp.dtype(x.dtype).name,
    like.signed,
    like.pad,
    like.block_size,
    like.rows,
  )
  return _materialized(
    lambda: _encode(x, like), shapes, step, materialize, like=x
  )


def _carry_index(carried, q_out, m: int, q: int) -> int:
  """Position in the flat carry of member ``m``'s ``q``-th carried output."""
  width = lambda o: 2 if o in q_out else 1
  return sum(width(o) for outs in carried[:m] for o in outs) + sum(
    width(o) for o in carried[m][:q]
  )


def _meta(q: QuantizedArray) -> tuple:
  return (q.shape, q.dtype, q.signed, q.pad, q.block_size, q.rows)
