"""Language-model unlearning study (TOFU-style) with a small Flax NNX transformer.

Run ``python examples/unlearn_lm/main.py --quick``. Modules:

* :mod:`unlearn_lm.cli` — flags, defaults and their validation (no JAX import).
* :mod:`unlearn_lm.tokenizer` — byte-level tokenizer, and a byte-level BPE
  (``tokenizers``) trained on the fine-tuning texts.
* :mod:`unlearn_lm.model` — decoder-only transformer and its functional wrapper.
* :mod:`unlearn_lm.data` — fictitious-people generator, TOFU-format reader,
  encoding.
* :mod:`unlearn_lm.metrics` — ROUGE-L recall, probabilities, truth ratio, KS
  Forget Quality, Model Utility, Forget Efficacy, and an ``Evaluator`` of one
  model or of a stack of them.
* :mod:`unlearn_lm.train` — jitted ``lax.scan`` chunks (fine-tuning, the
  alternating unlearning loop and its ``vmap`` over a sweep), mesh sharding,
  Orbax checkpoints.
* :mod:`unlearn_lm.pipeline` — the stages of a run: data, tokenizer, lengths,
  fine-tuning (or its checkpoint), one optimizer's resumable sweep.
* :mod:`unlearn_lm.report` — the study table, the figures and ``results.json``.

Nothing is imported here, so ``cli`` stays free of JAX.
"""
