"""The table between ouro_jax parameters and the released Hugging Face state dict.

ouro_jax stores Linear kernels as [in, out], attention kernels split by head ([D, heads, H] for q/k/v,
[heads, H, D] for o) and the N layers stacked on a leading axis; the HF state dict stores every
Linear as [out, in] and one tensor per layer. Each `Rule` names both sides, the HF shape and the two
transforms. Conversion is rule by rule (HF -> ouro_jax) or tensor by tensor (ouro_jax -> HF) so that a
model never needs two full copies in memory.
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
    hf_shape: tuple[int, ...]  # of one HF tensor (one layer for per-layer rules)
    to_hf: Callable[[np.ndarray], np.ndarray]  # one (unstacked) ouro_jax array -> HF layout
    from_hf: Callable[[np.ndarray], np.ndarray]  # HF tensor -> ouro_jax layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    def names(self, num_layers: int) -> list[str]:
        """The HF tensor names this rule covers (one per layer for per-layer rules)."""
        if self.per_layer:
            return [self.hf_name.format(i=i) for i in range(num_layers)]
        return [self.hf_name]


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def rules(config: OuroConfig) -> list[Rule]:
    """The complete table for `config` (lm_head only when embeddings are untied)."""
    d, h, f, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    n, k = config.num_attention_heads, config.num_key_value_heads

    def split_heads(heads):  # HF [heads*H, D] <-> ouro_jax [D, heads, H]
        return (lambda x: np.ascontiguousarray(x.reshape(d, heads * h).T),
                lambda w: np.ascontiguousarray(w.T.reshape(d, heads, h)))

    table = [
        Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d), _identity, _identity),
        Rule(("norm", "weight"), "model.norm.weight", (d,), _identity, _identity),
        Rule(("early_exit_gate", "kernel"), "model.early_exit_gate.weight", (1, d), _transpose,
             _transpose),
        Rule(("early_exit_gate", "bias"), "model.early_exit_gate.bias", (1,), _identity, _identity),
    ]
    if not config.tie_word_embeddings:
        table.append(Rule(("lm_head", "kernel"), "lm_head.weight", (v, d), _transpose, _transpose))
    layer = "model.layers.{i}."
    for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        table.append(Rule(("layers", "self_attn", name, "kernel"), layer + f"self_attn.{name}.weight",
                          (heads * h, d), *split_heads(heads)))
    table.append(Rule(  # HF [D, N*H] <-> ouro_jax [N, H, D]
        ("layers", "self_attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight", (d, n * h),
        lambda x: np.ascontiguousarray(x.reshape(n * h, d).T),
        lambda w: np.ascontiguousarray(w.T.reshape(n, h, d))))
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
        table.append(Rule(("layers", "mlp", name, "kernel"), layer + f"mlp.{name}.weight", shape,
                          _transpose, _transpose))
    for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                 "post_attention_layernorm_2"):
        table.append(Rule(("layers", name, "weight"), layer + f"{name}.weight", (d,), _identity,
                          _identity))
    return table


def hf_names(config: OuroConfig) -> list[str]:
    """Every tensor name of the HF state dict, in a stable order (the order of `to_hf_tensors`)."""
    return list(hf_shapes(config))


def hf_shapes(config: OuroConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor of the state dict, in `hf_names` order."""
    return {name: rule.hf_shape for rule in rules(config)
            for name in rule.names(config.num_hidden_layers)}


def tensor_problems(config: OuroConfig, found: dict[str, tuple[int, ...]], limit: int = 8) -> list[str]:
    """What keeps tensors `found` (HF name -> shape) from being exactly `config`'s state dict.

    Returns one line per kind of problem (missing, unexpected, wrong shape), each naming at most
    `limit` tensors; empty when names and shapes match exactly.
    """
    expected = hf_shapes(config)

    def listing(kind, items):
        more = f", … and {len(items) - limit} more" if len(items) > limit else ""
        return f"{len(items)} {kind}: " + ", ".join(items[:limit]) + more

    missing = [name for name in expected if name not in found]
    unexpected = sorted(name for name in found if name not in expected)
    wrong = [f"{name} {list(found[name])} (expected {list(shape)})" for name, shape in expected.items()
             if name in found and tuple(found[name]) != shape]
    kinds = (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong))
    return [listing(kind, items) for kind, items in kinds if items]


def to_hf_tensors(config: OuroConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) one tensor at a time from an ouro_jax pure param dict
    (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), in `hf_names` order; dtypes are kept.

    Each parameter is viewed on the host once (zero-copy for CPU arrays), so the only new memory is
    the one HF-layout tensor being yielded.
    """
    for rule in rules(config):
        value = params
        for key in rule.path:
            value = value[key]
        value = np.asarray(value)
        if rule.per_layer:
            for i, name in enumerate(rule.names(config.num_hidden_layers)):
                yield name, rule.to_hf(value[i])
        else:
            yield rule.hf_name, rule.to_hf(value)


def from_hf_tensors(config: OuroConfig, read: Callable[[str], np.ndarray],
                    dtype) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield (ouro_jax path, array in `dtype`) one rule at a time, the inverse of `to_hf_tensors`.

    `read(name)` returns the HF tensor `name` (any float dtype); per-layer tensors are written into
    one preallocated [N, ...] array, so a rule costs one stacked array plus one HF tensor.
    """
    for rule in rules(config):
        if not rule.per_layer:
            yield rule.path, np.asarray(rule.from_hf(read(rule.hf_name)), dtype)
            continue
        stacked = None
        for i, name in enumerate(rule.names(config.num_hidden_layers)):
            layer = rule.from_hf(read(name))
            if stacked is None:
                stacked = np.empty((config.num_hidden_layers, *layer.shape), dtype)
            stacked[i] = layer
        yield rule.path, stacked


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
