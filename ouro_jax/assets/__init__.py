"""Data files shipped with ouro_jax: the Ouro (SmolLM2) tokenizer and the script that regenerates it."""
