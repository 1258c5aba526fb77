"""Language-model unlearning (TOFU-style) with a small Flax NNX transformer.

Run ``python examples/unlearn_lm/main.py --quick``. Modules:

* :mod:`unlearn_lm.cli` — flags, defaults and their validation (no JAX import,
  so ``--mesh`` can still ask XLA for host devices).
* :mod:`unlearn_lm.tokenizer` — byte-level tokenizer (no downloads).
* :mod:`unlearn_lm.model` — decoder-only transformer and its functional wrapper.
* :mod:`unlearn_lm.data` — fictitious-people generator, TOFU-format reader,
  encoding.
* :mod:`unlearn_lm.metrics` — ROUGE-L recall, probabilities, truth ratio, KS
  Forget Quality, Model Utility, Forget Efficacy, and an ``Evaluator``.
* :mod:`unlearn_lm.train` — jitted ``lax.scan`` chunks (fine-tuning and the
  alternating unlearning loop), mesh sharding, Orbax checkpoints.
* :mod:`unlearn_lm.pipeline` — the stages of a run: data, fine-tuning (or its
  checkpoint), one optimizer's resumable unlearning run.
* :mod:`unlearn_lm.report` — the table, the figure and ``results.json``.

Nothing is imported here: importing the package must not start JAX before
``main`` has set ``XLA_FLAGS``.
"""
