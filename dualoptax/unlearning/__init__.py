"""Machine unlearning toolkit for any model: objective losses and metrics.

``from dualoptax import unlearning`` then e.g. ``unlearning.npo_loss(...)``.
Both modules are pure functions of arrays (the math is in ``docs/algorithm.md``).
The membership-inference attack in :mod:`dualoptax.unlearning.metrics` needs
scikit-learn (``pip install 'dualoptax[examples]'``), imported only when it is
called, so importing this package pulls in nothing beyond JAX and NumPy.

Models and training loops are applications: see ``examples/unlearn_digits/``
and ``examples/unlearn_lm/``.
"""

from dualoptax.unlearning import losses, metrics
from dualoptax.unlearning.losses import (
  classifier_ga_loss,
  classifier_gd_loss,
  classifier_kl_loss,
  classifier_me_loss,
  classifier_nll,
  classifier_npo_loss,
  ga_loss,
  gd_loss,
  idk_loss,
  kl_loss,
  me_loss,
  mean_token_nll,
  npo_loss,
  random_label_loss,
  random_wrong_labels,
  sequence_nll,
  token_nll,
)
from dualoptax.unlearning.metrics import (
  accuracy,
  average_gap,
  format_table,
  mia_rate,
  softmax_entropy,
  summarize,
  text_table,
  unlearning_metrics,
)
