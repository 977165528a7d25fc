"""The table between ouro_jax parameters and the released Hugging Face state dict (ouro_spec.md §4).

ouro_jax stores Linear kernels as [in, out], attention kernels split by head ([D, heads, H] for q/k/v,
[heads, H, D] for o) and the N layers stacked on a leading axis; the HF state dict stores every
Linear as [out, in] and one tensor per layer. Each `Rule` names both sides and the two transforms.
Conversion is tensor by tensor so that a model never needs two full copies in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from ouro_jax.model.config import OuroConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: its ouro_jax path, its HF name (with `{i}` for per-layer tensors), transforms."""

    path: Path
    hf_name: str
    to_hf: Callable[[np.ndarray], np.ndarray]  # one (unstacked) ouro_jax array -> HF layout
    from_hf: Callable[[np.ndarray], np.ndarray]  # HF tensor -> ouro_jax layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def rules(config: OuroConfig) -> list[Rule]:
    """The complete table for `config` (lm_head only when embeddings are untied)."""
    d, h = config.hidden_size, config.head_dim
    n, k = config.num_attention_heads, config.num_key_value_heads

    def split_heads(heads):  # HF [heads*H, D] <-> ouro_jax [D, heads, H]
        return (lambda x: np.ascontiguousarray(x.reshape(d, heads * h).T),
                lambda w: np.ascontiguousarray(w.T.reshape(d, heads, h)))

    table = [
        Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight", _identity, _identity),
        Rule(("norm", "weight"), "model.norm.weight", _identity, _identity),
        Rule(("early_exit_gate", "kernel"), "model.early_exit_gate.weight", _transpose, _transpose),
        Rule(("early_exit_gate", "bias"), "model.early_exit_gate.bias", _identity, _identity),
    ]
    if not config.tie_word_embeddings:
        table.append(Rule(("lm_head", "kernel"), "lm_head.weight", _transpose, _transpose))
    layer = "model.layers.{i}."
    for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        table.append(Rule(("layers", "self_attn", name, "kernel"), layer + f"self_attn.{name}.weight",
                          *split_heads(heads)))
    table.append(Rule(  # HF [D, N*H] <-> ouro_jax [N, H, D]
        ("layers", "self_attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight",
        lambda x: np.ascontiguousarray(x.reshape(n * h, d).T),
        lambda w: np.ascontiguousarray(w.T.reshape(n, h, d))))
    for name in ("gate_proj", "up_proj", "down_proj"):
        table.append(Rule(("layers", "mlp", name, "kernel"), layer + f"mlp.{name}.weight",
                          _transpose, _transpose))
    for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                 "post_attention_layernorm_2"):
        table.append(Rule(("layers", name, "weight"), layer + f"{name}.weight", _identity, _identity))
    return table


def hf_names(config: OuroConfig) -> list[str]:
    """Every tensor name of the HF state dict, in a stable order."""
    names = []
    for rule in rules(config):
        if rule.per_layer:
            names += [rule.hf_name.format(i=i) for i in range(config.num_hidden_layers)]
        else:
            names.append(rule.hf_name)
    return names


def to_hf_tensors(config: OuroConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) one tensor at a time from an ouro_jax pure param dict
    (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`); dtypes are kept."""
    for rule in rules(config):
        value = params
        for key in rule.path:
            value = value[key]
        if rule.per_layer:
            for i in range(config.num_hidden_layers):
                yield rule.hf_name.format(i=i), rule.to_hf(np.asarray(value[i]))
        else:
            yield rule.hf_name, rule.to_hf(np.asarray(value))


def to_torch(model, dtype: str = "float32"):
    """The same weights as a PyTorch `OuroForCausalLM` (our modeling file), in eval mode.

    Needs the [torch] extra. `model` is an `ouro_jax.Ouro`.
    """
    import torch
    from flax import nnx

    from ouro_jax.convert.configuration_ouro import OuroConfig as TorchOuroConfig
    from ouro_jax.convert.modeling_ouro import OuroForCausalLM

    torch_dtype = getattr(torch, dtype)
    torch_model = OuroForCausalLM(TorchOuroConfig(**model.config.to_hf_dict())).to(torch_dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {name: torch.tensor(np.asarray(value, np.float32), dtype=torch_dtype)
               for name, value in to_hf_tensors(model.config, params)}
    torch_model.load_state_dict(tensors, strict=True)
    return torch_model.eval()
