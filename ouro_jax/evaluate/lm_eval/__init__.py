"""lm-evaluation-harness support (the [eval] extra): importing this package registers the model "ouro_jax".

  python -m ouro_jax.evaluate.lm_eval --model_args pretrained=PATH --tasks TASKS [lm-eval's options]

or, in Python, `import ouro_jax.evaluate.lm_eval` and then `lm_eval.simple_evaluate(model="ouro_jax",
model_args=..., tasks=[...])`. Model args: `ouro_jax.evaluate.lm_eval.model`.
"""

from ouro_jax.evaluate.lm_eval.model import OuroLM

__all__ = ["OuroLM"]
