"""dualoptax: DualOptim+ for JAX and optax."""

# The optimizers.
# Unlearning losses and metrics.
from dualoptax import unlearning
from dualoptax._engine import AdamMoments, DeltaState
from dualoptax.diagnostics import bridging_stats
from dualoptax.dual_optim import DualOptimState, dual_optim
from dualoptax.dual_optim_plus import (
  STATIC_8BIT_ARGS,
  DualOptimPlusState,
  dual_optim_plus,
  dual_optim_plus_8bit,
  scale_by_dual_optim_plus,
)

# 8-bit state.
from dualoptax.quantization import (
  QuantizedArray,
  dequantize_blockwise,
  dynamic_code_map,
  quantize_blockwise,
)
from dualoptax.quantized_state import (
  quantize_state,
  state_nbytes,
  update_and_apply,
)
from dualoptax.schedules import alternating_index, switch_objective
from dualoptax.wrappers import (
  AccumulateState,
  PerObjectiveState,
  accumulate_objectives,
  per_objective,
)

__version__ = "0.1.0"

# Multi-task learning.
from dualoptax.cagrad import CAGradState, cagrad
from dualoptax.mgda import MGDAState, mgda
from dualoptax.pcgrad import PCGradState, pcgrad
