"""Evaluation of looped models, loop by loop (arXiv:2510.25741 §5.4.1): `python -m ouro_jax.evaluate`.

  metrics      per-loop CE / perplexity / accuracy and the exit rules' accuracy vs depth (`evaluate`)
  policies     the exit rules applied to a forward pass that computed every loop
  plots        matplotlib figures (`figures`, and `loop_figures` for the training evaluation)
  data         evaluation batches: a run's held-out data, a task, or text files
  lm_eval      the lm-evaluation-harness model "ouro_jax" (needs the [eval] extra)
  tasks        lm-eval tasks at every loop count and Q-exit threshold from one pass (`--tasks`)
"""
