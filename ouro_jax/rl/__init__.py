"""On-policy RL for Ouro where the trainer replays every token's exit loop as the sampler ran it
(reference/rl_facts.md): `replay` (exit replay), `losses` (advantages, GRPO / CISPO / KL,
exit log-probs), `rewards`, and the trainer
`python -m ouro_jax.rl --config=configs/rl.py:VARIANT --workdir=DIR`."""
