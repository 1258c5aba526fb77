"""Machine unlearning: losses (SPEC §4), metrics (SPEC §5) and jitted loops.

``from dualoptax import unlearning`` then e.g. ``unlearning.npo_loss(...)``.
The metrics module uses scikit-learn for the membership-inference attack
(``pip install 'dualoptax[examples]'``); it is imported lazily there.
"""

from dualoptax.unlearning import losses
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
from dualoptax.unlearning import loop, metrics, models
from dualoptax.unlearning.loop import alternating_scan, sample_batch, summed_scan
from dualoptax.unlearning.metrics import (
    accuracy,
    average_gap,
    format_table,
    mia_rate,
    softmax_entropy,
    summarize,
    unlearning_metrics,
)
from dualoptax.unlearning.models import DigitsCNN, functional_model
