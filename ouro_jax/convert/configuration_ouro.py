"""Hugging Face configuration of Ouro (LoopLM, arXiv:2510.25741), written for ouro_jax exports.

The keys are those of the released Ouro `config.json`; the defaults are the Ouro-1.4B values.
RoPE is kept as the released top-level `rope_theta` / `rope_scaling` keys (not transformers-5's
`rope_parameters`), so a saved `config.json` stays readable by every Ouro runtime.
"""

from transformers import PretrainedConfig


class OuroConfig(PretrainedConfig):
    """Ouro hyper-parameters.

    Ouro runs all `num_hidden_layers` decoder layers `total_ut_steps` times, with `model.norm` after
    every loop; `early_exit_threshold` is the default Q-exit quantile q (1.0: always the last step).
    Only plain RoPE (`rope_scaling` None or of type "default") and full attention are supported.
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ("past_key_values",)
    # Shadows transformers-5's `rope_scaling` property (which would rewrite it into `rope_parameters`).
    rope_scaling = None

    def __init__(
        self,
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=65536,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        layer_types=None,
        attention_dropout=0.0,
        total_ut_steps=4,
        early_exit_threshold=1.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **kwargs,
    ):
        rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"Ouro uses plain RoPE; rope_scaling of type {rope_type!r} is not supported")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.layer_types = layer_types or ["full_attention"] * num_hidden_layers
        self.attention_dropout = attention_dropout
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )


__all__ = ["OuroConfig"]
