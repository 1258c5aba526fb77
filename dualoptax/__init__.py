"""dualoptax: DualOptim+ for JAX and optax."""

# --- core (issue 2) ---
from dualoptax._engine import DeltaState
from dualoptax.diagnostics import bridging_stats
from dualoptax.dual_optim import DualOptimState, dual_optim
from dualoptax.dual_optim_plus import (
    DualOptimPlusState,
    dual_optim_plus,
    scale_by_dual_optim_plus,
)
from dualoptax.schedules import alternating_index, switch_objective
from dualoptax.wrappers import (
    AccumulateState,
    PerObjectiveState,
    accumulate_objectives,
    per_objective,
)

# --- 8-bit state (issue 3) ---
from dualoptax.quantization import (
    QuantizedArray,
    dequantize_blockwise,
    dynamic_code_map,
    quantize_blockwise,
)
from dualoptax.quantized_state import (
    dual_optim_plus_8bit,
    quantize_state,
    state_nbytes,
)

# --- unlearning (issue 4) ---
from dualoptax import unlearning

__version__ = "0.1.0"
