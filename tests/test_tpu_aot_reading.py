"""How benchmarks/tpu_aot.py reads HBM traffic off a compiled TPU HLO, and how
it pairs compile times.

The TPU figures in README.md and benchmarks/RESULTS.md come from this reading;
these tests pin it on small hand-written HLO modules in the TPU compiler's
notation (``S(1)``: an array XLA placed in VMEM), so they need no libtpu.
"""

from benchmarks import tpu_aot

F32 = 4


def module(*body: str) -> str:
  return "\n".join(
    ["HloModule m", "", "ENTRY %main (x: f32[]) -> f32[] {", *body, "}"]
  )


def test_a_slice_reads_only_its_part_of_the_source():
  # An HBM array prefetched into VMEM in four slices: its bytes once, not four
  # times its size; the slices land in VMEM (no HBM write).
  slices = [
    f"  %s{k} = ((f32[1024,128]{{1,0}}), f32[256,128]{{1,0:S(1)}}, s32[]) "
    f"slice-start(%g), slice={{[{256 * k}:{256 * (k + 1)}], [0:128]}}"
    for k in range(4)
  ]
  done = [
    f"  %d{k} = f32[256,128]{{1,0:S(1)}} slice-done(%s{k})" for k in range(4)
  ]
  text = module("  %g = f32[1024,128]{1,0} parameter(0)", *slices, *done)
  assert tpu_aot.hbm_traffic(text) == 1024 * 128 * F32


def test_a_prefetch_counts_its_source_and_an_eviction_its_destination():
  text = module(
    "  %a = f32[64,128]{1,0} parameter(0)",
    "  %c = (f32[64,128]{1,0:S(1)}, f32[64,128]{1,0}, u32[]) copy-start(%a)",
    "  %v = f32[64,128]{1,0:S(1)} copy-done(%c)",
    "  %e = (f32[64,128]{1,0}, f32[64,128]{1,0:S(1)}, u32[]) copy-start(%v)",
    "  %h = f32[64,128]{1,0} copy-done(%e)",
  )
  assert tpu_aot.hbm_traffic(text) == 2 * 64 * 128 * F32


def test_an_instruction_counts_its_hbm_operands_once_and_its_hbm_result():
  text = module(
    "  %a = f32[64,128]{1,0} parameter(0)",
    "  %b = f32[64,128]{1,0:S(1)} parameter(1)",
    "  %f = f32[64,128]{1,0} fusion(%a, %b, %a), kind=kLoop, calls=%fused",
  )
  # %a read once (though named twice), %b in VMEM, the result written.
  assert tpu_aot.hbm_traffic(text) == 2 * 64 * 128 * F32


def test_a_conditional_over_scalars_counts_them_and_over_arrays_is_unknown():
  scalar = module(
    "  %p = pred[] parameter(0)",
    "  %c = (pred[]) conditional(%p), branch_computations={%t, %f}",
  )
  assert tpu_aot.hbm_traffic(scalar) == 2
  array = module(
    "  %p = pred[] parameter(0)",
    "  %a = f32[64,128]{1,0} parameter(1)",
    "  %c = (f32[64,128]{1,0}) conditional(%p, %a), branch_computations={%t}",
  )
  assert tpu_aot.hbm_traffic(array) is None


def test_compile_rounds_pair_each_ratio_with_its_round(capsys):
  """The ratio is the median over rounds of (update / first update in the same
  round), not a ratio of medians: a slow round slows both."""
  from unittest import mock

  seconds = iter([1.0, 3.0, 2.0, 5.0, 4.0, 12.0])  # rounds: (a, b) in turn
  fake = lambda *args: {"compile": next(seconds)}
  with mock.patch.object(tpu_aot, "measure", fake):
    times = tpu_aot.compile_rounds(
      {"a": (None, None), "b": (None, None)}, None, 3, "input", "separate"
    )
  assert times == {"a": [1.0, 2.0, 4.0], "b": [3.0, 5.0, 12.0]}
  out = capsys.readouterr().out
  # ratios 3.0, 2.5, 3.0: median 3.00 (medians 2.0 and 5.0 would give 2.50)
  assert "b                 compile median   5.0 s, 3.00x the first" in out
  assert "(rounds: 3.00, 2.50, 3.00)" in out
