"""The PyTorch / Hugging Face Ouro shipped in exports (ouro_jax.convert): float64 oracle parity, the
per-step KV cache, left-padded batched generation, early-exit selection and remote-code loading."""

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ouro_jax.convert import configuration_ouro, modeling_ouro
from ouro_jax.convert.configuration_ouro import OuroConfig
from ouro_jax.convert.modeling_ouro import OuroForCausalLM

import oracle

pytestmark = pytest.mark.torch

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, total_ut_steps=4, rope_theta=10_000.0, max_position_embeddings=256,
)
TOL = dict(atol=1e-5, rtol=0)


def make_model(seed=0, **overrides) -> OuroForCausalLM:
    """A tiny float32 model; norms, gate weight and bias moved away from their 1 / 0 init so that
    their use is visible and Q-exit picks different steps for different tokens."""
    torch.manual_seed(seed)
    model = OuroForCausalLM(OuroConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
        model.model.early_exit_gate.weight.mul_(20.0)
        model.model.early_exit_gate.bias.normal_(0.0, 1.0)
    return model


def ids(batch, seq, seed=0):
    return torch.randint(1, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def oracle_forward(model, input_ids, **kwargs):
    """(logits [T, B, S, V], gate_logits [T, B, S]) of the float64 NumPy oracle on the model's weights."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    return oracle.forward(sd, model.config.to_dict(), input_ids.numpy(), **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_model()


def expected_names(cfg: OuroConfig) -> set[str]:
    """The released state-dict names."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight",
             "model.early_exit_gate.bias", "lm_head.weight"}
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
        f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + [
        f"{n}.weight" for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                                "post_attention_layernorm_2")]
    return names | {f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in per_layer}


def test_parameter_names_and_shapes(model):
    sd = model.state_dict()
    assert set(sd) == expected_names(model.config)
    assert set(dict(model.named_parameters())) == expected_names(model.config)  # no extra buffers
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 64)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 16)
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    assert sd["model.early_exit_gate.weight"].shape == (1, 64)
    assert sd["model.early_exit_gate.bias"].shape == (1,)


def test_init_weights():
    torch.manual_seed(0)
    model = OuroForCausalLM(OuroConfig(**TINY, initializer_range=0.05))
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif param.numel() > 1000:
            assert abs(param.std().item() - 0.05) < 0.01, name
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize("overrides", [
    {},  # GQA: 4 heads / 2 kv heads
    {"num_key_value_heads": 4, "head_dim": 24, "total_ut_steps": 3},  # MHA, heads * head_dim != hidden
    {"tie_word_embeddings": True},
])
def test_all_steps_match_oracle(overrides):
    model = make_model(seed=1, **overrides)
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    x = ids(2, 9)
    with torch.no_grad():
        out = model(x, output_all_steps=True)
        base = model.model(x)
    ref_logits, ref_gates = oracle_forward(model, x)
    assert out.all_step_logits.shape == ref_logits.shape == (model.config.total_ut_steps, 2, 9, 128)
    np.testing.assert_allclose(out.all_step_logits.numpy(), ref_logits, **TOL)
    np.testing.assert_allclose(base.gate_logits.numpy(), ref_gates, **TOL)
    assert base.hidden_states_per_step.shape == (model.config.total_ut_steps, 2, 9, 64)
    assert torch.equal(base.last_hidden_state, base.hidden_states_per_step[-1])
    np.testing.assert_allclose(out.exit_pdf.numpy(), oracle.exit_pdf(ref_gates), atol=1e-6)


def left_pad(rows, width):
    """Left-pad 1-D id tensors with 0 to `width`: (ids [B, width], attention_mask [B, width])."""
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        x[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return x, mask


def test_left_padded_forward_matches_oracle(model):
    rows = [ids(1, n, seed=n)[0] for n in (4, 9, 6)]
    x, mask = left_pad(rows, 9)
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_all_steps=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0).numpy()
    ref_logits, _ = oracle_forward(model, x, positions=positions, segment_ids=mask.numpy() - 1)
    real = mask.bool().numpy()
    np.testing.assert_allclose(out.all_step_logits.numpy()[:, real], ref_logits[:, real], **TOL)
    assert torch.isfinite(out.all_step_logits).all()  # padding queries stay finite


def test_exit_selection(model):
    x = ids(3, 10)
    steps = model.config.total_ut_steps
    with torch.no_grad():
        full = model(x, output_all_steps=True)
        _, ref_gates = oracle_forward(model, x)
        for k in range(steps):
            out = model(x, exit_at_step=k)
            np.testing.assert_allclose(out.logits.numpy(), full.all_step_logits[k].numpy(), atol=1e-6)
            assert (out.exit_steps == k).all()
        last = model(x, exit_threshold=1.0)
        assert (last.exit_steps == steps - 1).all()
        np.testing.assert_allclose(last.logits.numpy(), full.all_step_logits[-1].numpy(), atol=1e-6)
        assert (model(x, exit_threshold=0.0).exit_steps == 0).all()

        half = model(x, exit_threshold=0.5)
        ref_cdf = np.cumsum(oracle.exit_pdf(ref_gates), axis=0)
        ref_steps = np.argmax(ref_cdf >= 0.5, axis=0)
        np.testing.assert_array_equal(half.exit_steps.numpy(), ref_steps)
        assert len(np.unique(ref_steps)) >= 2, "the test needs tokens exiting at different steps"
        gathered = np.take_along_axis(full.all_step_logits.numpy(), ref_steps[None, ..., None], 0)[0]
        np.testing.assert_allclose(half.logits.numpy(), gathered, atol=1e-6)

    pdf = full.exit_pdf
    assert pdf.dtype == torch.float32 and pdf.shape == (steps, 3, 10)
    np.testing.assert_allclose(pdf.sum(0).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(pdf.numpy(), oracle.exit_pdf(ref_gates), atol=1e-6)


def test_default_threshold_comes_from_config():
    x = ids(2, 8)
    model = make_model(early_exit_threshold=0.5)
    with torch.no_grad():
        default, explicit = model(x), model(x, exit_threshold=0.5)
        model.config.early_exit_threshold = None
        assert (model(x).exit_steps == model.config.total_ut_steps - 1).all()
    assert torch.equal(default.exit_steps, explicit.exit_steps)
    assert torch.equal(default.logits, explicit.logits)


def test_threshold_one_is_last_step_even_with_saturated_gates():
    """With gate logits so large that float32 sigmoid rounds to 1, q=1.0 must still mean the last step."""
    model = make_model()
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(40.0)
        out = model(ids(2, 5), exit_threshold=1.0)
    assert (out.exit_steps == model.config.total_ut_steps - 1).all()
    assert (out.exit_pdf[0] == 1.0).all()  # lambda_0 rounds to 1: all mass on step 0


def _reference_losses(model, x, labels, beta):
    """(released, stage1, mixture) in float64 from the oracle: the next-token CE of the exit-pdf-weighted
    mixture of the steps' logits, sum_t p_t CE_t - beta H(p) (means over labels != -100), and that mixture
    [B, S, V] at every position."""
    logits, gates = oracle_forward(model, x)  # [T, B, S, V], [T, B, S]
    mixture = np.einsum("tbsv,tbs->bsv", logits, oracle.exit_pdf(gates))
    pdf = oracle.exit_pdf(gates)[:, :, :-1]
    targets = labels[:, 1:].numpy()
    used = targets != -100
    safe = np.where(used, targets, 0)
    released = oracle.cross_entropy(mixture[:, :-1], safe)[used].mean()
    per_step = np.stack([oracle.cross_entropy(step[:, :-1], safe) for step in logits])
    entropy = -(pdf * np.log(pdf)).sum(0)
    stage1 = ((pdf * per_step).sum(0) - beta * entropy)[used].mean()
    return released, stage1, mixture


def test_labels_loss_is_the_released_one_by_default_and_stage1_on_request():
    model = make_model().train()
    x = ids(2, 8)
    labels = x.clone()
    labels[0, 3] = labels[1, 6] = -100
    released, stage1, mixture = _reference_losses(model, x, labels, beta=0.3)
    # the loss does not depend on the step selection, and the returned logits are the mixture the
    # released code takes the loss of (not the exit step's logits)
    for kwargs in ({}, {"exit_at_step": 1}, {"exit_threshold": 0.5}):
        out = model(x, labels=labels, **kwargs)
        np.testing.assert_allclose(out.loss.item(), released, rtol=1e-5)
        np.testing.assert_allclose(out.logits.detach().numpy(), mixture, rtol=1e-4, atol=1e-5)
        assert out.exit_steps is None
    plain = model(x, exit_at_step=1).logits.detach().numpy()
    assert np.abs(plain - mixture).max() > 1e-3  # without labels: the exit step's logits, not the mixture
    out = model(x, labels=labels, loss_objective="stage1", entropy_beta=0.3)
    np.testing.assert_allclose(out.loss.item(), stage1, rtol=1e-5)
    assert abs(released - stage1) > 1e-3  # the two objectives differ on this model
    # transformers' gradient accumulation: the sum over labelled tokens / num_items_in_batch
    summed = model(x, labels=labels, num_items_in_batch=torch.tensor(7.0)).loss
    np.testing.assert_allclose(summed.item(), released * 12 / 7, rtol=1e-5)  # 14 targets, 2 ignored
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.early_exit_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss_objective"):
        model(x, labels=labels, loss_objective="stage2")


def test_weighted_exit_and_config_exit_step_are_honoured():
    x = ids(2, 8)
    model = make_model(early_exit_step=2)
    with torch.no_grad():
        full = model(x, output_all_steps=True, exit_at_step=3)
        assert (model(x).exit_steps == 2).all()  # config.early_exit_step wins over the threshold
        np.testing.assert_allclose(model(x, exit_threshold=0.0).logits.numpy(),
                                   full.all_step_logits[2].numpy(), atol=1e-6)
        assert (model(x, exit_at_step=0).exit_steps == 0).all()  # the argument wins over the config
        model.config.early_exit_step = None
        # with a threshold (the config's 1.0 by default) the weighted exit is not used ...
        assert (model(x, use_weighted_exit=True).exit_steps == 3).all()
        model.config.early_exit_threshold = None
        weighted = model(x, use_weighted_exit=True)
        assert (model(x).exit_steps == 3).all()
    # ... without one it returns the exit-pdf-weighted mixture of the steps' logits
    logits, gates = oracle_forward(model, x)
    expected = np.einsum("tbsv,tbs->bsv", logits, oracle.exit_pdf(gates))
    assert weighted.exit_steps is None
    np.testing.assert_allclose(weighted.logits.numpy(), expected, atol=1e-5)


def test_unknown_keyword_arguments_are_rejected(model):
    x = ids(1, 4)
    with pytest.raises(TypeError, match="'use_weigthed_exit'"):
        model(x, use_weigthed_exit=True)
    with pytest.raises(TypeError, match="'exit_step', 'foo'"):
        model.model(x, foo=1, exit_step=2)
    with torch.no_grad():  # what generate / Trainer pass is accepted
        model(x, return_dict=True, cache_position=torch.arange(4), output_attentions=False,
              output_hidden_states=False)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_matches_full_forward(model, padded):
    """Prompt, then new tokens in chunks of 1, 2 and 1 from the per-step cache: every step's logits
    equal those of the uncached full forward."""
    lengths = (5, 3) if padded else (5, 5)
    prompt, mask = left_pad([ids(1, n, seed=n)[0] for n in lengths], 5)
    new = ids(2, 4, seed=3)
    full_ids = torch.cat([prompt, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1) if padded else None
    steps, layers = model.config.total_ut_steps, model.config.num_hidden_layers
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, use_cache=False, output_all_steps=True)
        prefix = mask if padded else None
        cache = model(prompt, attention_mask=prefix, use_cache=True).past_key_values
        assert len(cache.layers) == steps * layers
        start = prompt.shape[1]
        for chunk in (1, 2, 1):
            end = start + chunk
            out = model(full_ids[:, start:end], attention_mask=full_mask[:, :end] if padded else None,
                        past_key_values=cache, use_cache=True, output_all_steps=True)
            np.testing.assert_allclose(out.all_step_logits.numpy(),
                                       full.all_step_logits[:, :, start:end].numpy(), **TOL)
            start = end
    assert all(layer.keys.shape == (2, 2, 9, 16) for layer in cache.layers)


def greedy_reference(model, row, new_tokens, **exit_kwargs):
    """Greedy continuation of one unpadded prompt, recomputing the full forward at every token."""
    x = row[None]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(x, use_cache=False, **exit_kwargs).logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(row):]


EXIT_KWARGS = [{}, {"exit_threshold": 0.5}, {"exit_at_step": 0}, {"exit_at_step": 2}]


def test_generate_left_padded_batch_matches_single_rows(model):
    rows = [ids(1, n, seed=10 + n)[0] for n in (3, 8, 5)]
    x, mask = left_pad(rows, 8)
    new_tokens = 6
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    references = []
    for kwargs in EXIT_KWARGS:
        ref = [greedy_reference(model, row, new_tokens, **kwargs) for row in rows]
        references.append(torch.stack(ref))
        with torch.no_grad():
            batch = model.generate(x, attention_mask=mask, **gen_kwargs, **kwargs)[:, x.shape[1]:]
            singles = [model.generate(row[None], **gen_kwargs, **kwargs)[0, len(row):] for row in rows]
        for b in range(len(rows)):
            assert torch.equal(batch[b], ref[b]), (kwargs, b, batch[b], ref[b])
            assert torch.equal(singles[b], ref[b]), (kwargs, b)
    # the exit arguments reach the model through generate(): different settings, different tokens
    assert len({tuple(r.flatten().tolist()) for r in references}) == len(EXIT_KWARGS)


def test_config_json_round_trip(tmp_path):
    released = dict(
        architectures=["OuroForCausalLM"], model_type="ouro", vocab_size=49152, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        head_dim=128, hidden_act="silu", max_position_embeddings=65536, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=False, rope_theta=1000000.0,
        rope_scaling=None, use_sliding_window=False, sliding_window=None, max_window_layers=28,
        layer_types=["full_attention"] * 24, attention_dropout=0.0, total_ut_steps=4,
        early_exit_threshold=1.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    (tmp_path / "config.json").write_text(json.dumps(released))
    cfg = OuroConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.head_dim == 128
    cfg.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: saved[k] for k in released} == released
    assert "rope_parameters" not in saved
    assert OuroConfig.from_pretrained(tmp_path / "saved").to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="plain RoPE"):
        OuroConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_save_and_load_as_remote_code(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    model.save_pretrained(tmp_path)
    for module in (configuration_ouro, modeling_ouro):
        shutil.copy(module.__file__, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_ouro.OuroConfig",
        "AutoModel": "modeling_ouro.OuroModel",
        "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, local_files_only=True)
    assert type(loaded).__name__ == "OuroForCausalLM"
    assert type(loaded).__module__ != OuroForCausalLM.__module__  # the copied file, not our package
    assert loaded.config.rope_theta == model.config.rope_theta
    x = ids(2, 7)
    with torch.no_grad():
        ours = model(x, output_all_steps=True, exit_threshold=0.5)
        theirs = loaded.eval()(x, output_all_steps=True, exit_threshold=0.5)
    assert torch.equal(ours.all_step_logits, theirs.all_step_logits)
    assert torch.equal(ours.logits, theirs.logits)
