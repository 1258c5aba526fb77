"""dualoptax: DualOptim+ for JAX and optax."""

# --- core (issue 2) ---

# --- 8-bit state (issue 3) ---

# --- unlearning (issue 4) ---

__version__ = "0.1.0"
