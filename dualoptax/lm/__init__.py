"""Language-model unlearning (TOFU-style) with a small Flax NNX transformer.

Import explicitly: ``import dualoptax.lm`` (not re-exported by ``dualoptax``).

* :mod:`dualoptax.lm.tokenizer` — byte-level tokenizer (no downloads).
* :mod:`dualoptax.lm.model` — decoder-only transformer and its functional wrapper.
* :mod:`dualoptax.lm.data` — fictitious-people generator, TOFU-format reader, encoding.
* :mod:`dualoptax.lm.metrics` — ROUGE-L recall, probabilities, truth ratio, KS Forget
  Quality, Model Utility, Forget Efficacy, and an :class:`~dualoptax.lm.metrics.Evaluator`.
* :mod:`dualoptax.lm.train` — jitted ``lax.scan`` chunks (fine-tuning and the alternating
  unlearning loop), mesh sharding, Orbax checkpoints.

The end-to-end pipeline is ``examples/unlearn_lm.py``.
"""

from dualoptax.lm import data, metrics, model, tokenizer, train
from dualoptax.lm.data import QA, UnlearningData, encode_prompts, encode_qa, generate_people, load_tofu
from dualoptax.lm.metrics import Evaluator, ks_2samp, rouge_l_recall, truth_ratio
from dualoptax.lm.model import LanguageModel, Transformer, TransformerConfig
from dualoptax.lm.tokenizer import ByteTokenizer
from dualoptax.lm.train import (
    RunCheckpointer,
    TrainState,
    make_finetune_chunk,
    make_mesh,
    make_unlearn_chunk,
    parse_mesh,
)

__all__ = [
    "QA", "UnlearningData", "encode_prompts", "encode_qa", "generate_people", "load_tofu",
    "Evaluator", "ks_2samp", "rouge_l_recall", "truth_ratio",
    "LanguageModel", "Transformer", "TransformerConfig", "ByteTokenizer",
    "RunCheckpointer", "TrainState", "make_finetune_chunk", "make_mesh", "make_unlearn_chunk",
    "parse_mesh", "data", "metrics", "model", "tokenizer", "train",
]
