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

# --- unlearning (issue 4) ---

__version__ = "0.1.0"
