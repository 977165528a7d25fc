"""The synthetic reasoning suite: do looped models (K layers looped L times) reason like deeper ones?

Reproduces, at CPU scale, the comparisons of Saunshi et al. (arXiv:2502.17416) and Ouro (arXiv:2510.25741
§6, App. A, Fig. 5) on the tasks of `ouro_jax.data.tasks`: iso-parameter (K x 1) and iso-FLOP (KL x 1)
baselines, the Ouro objective against last-loop-only training, the entropy weight ablation, Stage II
against Stage I gates, and bits per parameter.

  plan     the runs of a study and their configs        measure  per-loop figures of a trained run
  suite    execute runs with a result cache (resume)    summary  tables and checks from the results
  report   results.json / results.md / PNG              python -m ouro_jax.experiments  the command
"""
