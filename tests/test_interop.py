"""Hugging Face interop (ouro_jax.convert.pretrained, `python -m ouro_jax.convert`): bit-identical
round trips, loading exports with transformers' remote code, the written config / generation config /
tokenizer files, sharding, every error case, the two CLIs and ouro_jax run directories."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ouro_jax import tokenizer as tokenizer_lib
from ouro_jax.convert import hf, pretrained
from ouro_jax.convert.pretrained import CheckpointError, from_pretrained, save_pretrained
from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro
from ouro_jax.run import restore_params

import util

pytestmark = pytest.mark.torch

CONFIG = tiny()  # GQA (4 heads, 2 kv heads), head_dim 16, 2 layers, T = 4, vocab 128
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12))
# config.json keys of the released Ouro checkpoints
RELEASED_KEYS = (
    "architectures", "model_type", "auto_map", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "initializer_range", "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "total_ut_steps", "early_exit_threshold", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "torch_dtype", "transformers_version",
)


def build(config, params) -> Ouro:
    """An Ouro for `config` holding `params` (a pure dict) cast to config.param_dtype."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params))
    return nnx.merge(graphdef, state)


def pure_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_params(config=CONFIG, seed=0) -> dict:
    """Random float32 params with norms, gate and LM head moved away from their init, so that a
    mix-up of any of them shows in the logits and the logits have a clear top-1."""
    params = jax.tree.map(np.asarray, pure_params(Ouro(config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    layers = params["layers"]
    for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                 "post_attention_layernorm_2"):
        layers[name]["weight"] = 1 + 0.3 * rng.standard_normal(layers[name]["weight"].shape, np.float32)
    params["norm"]["weight"] = 1 + 0.3 * rng.standard_normal(params["norm"]["weight"].shape, np.float32)
    params["early_exit_gate"]["kernel"] = params["early_exit_gate"]["kernel"] * 20
    params["early_exit_gate"]["bias"] = rng.standard_normal(1).astype(np.float32)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 50
    return params


def assert_params_identical(a: dict, b: dict):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8),
                                      err_msg=str(path))


@pytest.fixture(scope="module")
def params():
    return make_params()


@pytest.fixture(scope="module")
def model32(params):
    return build(CONFIG, params)


@pytest.fixture(scope="module")
def model16(params):
    return build(CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16"), params)


@pytest.fixture(scope="module")
def export32(model32, tmp_path_factory):
    return save_pretrained(model32, tmp_path_factory.mktemp("hf") / "f32", dtype="float32")


@pytest.fixture(scope="module")
def export16(model16, tmp_path_factory):
    return save_pretrained(model16, tmp_path_factory.mktemp("hf") / "bf16")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


def load_torch(directory, **kwargs):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, local_files_only=True,
                                                **kwargs).eval()


def torch_all_steps(model, ids=IDS):
    """(all-step logits [T, B, S, V], gate logits [T, B, S]) of a PyTorch Ouro, as float32 NumPy."""
    with torch.no_grad():
        x = torch.tensor(ids)
        logits = model(x, output_all_steps=True).all_step_logits
        gates = model.model(x).gate_logits
    return logits.float().numpy(), gates.float().numpy()


def test_table_matches_independent_layout(model32):
    """hf.to_hf_tensors agrees with the hand-written layout of tests/util.py, name by name."""
    ours = dict(hf.to_hf_tensors(CONFIG, pure_params(model32)))
    theirs = util.hf_state_dict(model32)
    assert list(ours) == hf.hf_names(CONFIG) and set(ours) == set(theirs)
    for name, value in ours.items():
        assert value.shape == hf.hf_shapes(CONFIG)[name]
        np.testing.assert_array_equal(value, theirs[name].astype(np.float32), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical(dtype, model32, model16, tmp_path):
    model = model32 if dtype == "float32" else model16
    out = save_pretrained(model, tmp_path / "hf", dtype=dtype)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32" if dtype == "float32" else "BF16"}
        assert f.metadata() == {"format": "pt"}
    loaded = from_pretrained(out, dtype=dtype)
    assert loaded.config == model.config
    assert_params_identical(pure_params(loaded), pure_params(model))
    ours, theirs = model(IDS), loaded(IDS)
    np.testing.assert_array_equal(np.asarray(theirs.logits), np.asarray(ours.logits))
    np.testing.assert_array_equal(np.asarray(theirs.gate_logits), np.asarray(ours.gate_logits))


def test_tied_embeddings(offline, tmp_path):
    """No lm_head.weight in the files; both loaders tie the LM head to the embedding."""
    config = CONFIG.replace(tie_word_embeddings=True)
    params = make_params()
    del params["lm_head"]
    model = build(config, params)
    out = save_pretrained(model, tmp_path / "tied", dtype="float32")
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert_params_identical(pure_params(from_pretrained(out)), pure_params(model))
    logits, _ = torch_all_steps(load_torch(out))
    np.testing.assert_allclose(logits, np.asarray(model(IDS).logits), atol=1e-4, rtol=0)


def test_float32_model_exported_as_bfloat16(model32, export16):
    """Exporting casts to the file dtype (round to nearest even), loading casts back up."""
    loaded = from_pretrained(export16, dtype="float32")
    expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32),
                            pure_params(model32))
    assert_params_identical(pure_params(loaded), expected)


def test_transformers_loads_float32_export(offline, model32, export32):
    hf_model = load_torch(export32)
    assert type(hf_model).__name__ == "OuroForCausalLM" and hf_model.dtype == torch.float32
    assert type(hf_model).__module__ != "ouro_jax.convert.modeling_ouro"  # the copied remote code
    logits, gates = torch_all_steps(hf_model)
    ours = model32(IDS)
    assert logits.shape == ours.logits.shape == (CONFIG.total_ut_steps, *IDS.shape, CONFIG.vocab_size)
    np.testing.assert_allclose(logits, np.asarray(ours.logits), atol=1e-4, rtol=0)
    np.testing.assert_allclose(gates, np.asarray(ours.gate_logits), atol=1e-4, rtol=0)


def test_exported_task_model_generates_past_ordinary_symbols(offline, tmp_path):
    """A model without a text tokenizer has no end-of-sequence id in generation_config.json: transformers'
    generate writes max_new_tokens even when the ids are 0 or 2 (eos/pad of the Ouro vocabulary)."""
    out = save_pretrained(build(CONFIG, confident_params()), tmp_path / "task")
    hf_model = load_torch(out)
    prompt = torch.tensor([[5, 9, 0]])  # confident_params copy the last token: 0 again and again
    with torch.no_grad():
        new = hf_model.generate(prompt, max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    assert new[0] == 0 and len(new) == 8, new


def confident_params(seed=0) -> dict:
    """Params whose logits have a clear top-1, as a trained model's do: the LM head reads back the
    (scaled-up) token embedding and the sub-layer post-norms are damped. With plain random weights
    about 2 % of the top-1s are near-ties that bf16 rounding flips in one implementation or the other."""
    params = make_params(seed=seed)
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 50
    params["lm_head"]["kernel"] = params["embed_tokens"]["embedding"].T * 3
    for name in ("input_layernorm_2", "post_attention_layernorm_2"):
        params["layers"][name]["weight"] = params["layers"][name]["weight"] * 0.2
    return params


def test_transformers_loads_bfloat16_export(offline, tmp_path):
    params = confident_params()
    model16 = build(CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16"), params)
    hf_model = load_torch(save_pretrained(model16, tmp_path / "hf"))
    assert hf_model.dtype == torch.bfloat16  # from config.json's dtype
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (8, 64))
    logits, _ = torch_all_steps(hf_model, ids)
    ours = np.asarray(model16(ids).logits)
    agreement = (logits.argmax(-1) == ours.argmax(-1)).mean(axis=(1, 2))  # per step
    assert agreement.min() >= 0.99, agreement
    # the layers decide: by the last step a good share of the top-1s is not the input token
    reference = np.asarray(build(CONFIG, params)(ids).logits)
    assert (reference[-1].argmax(-1) == ids).mean() < 0.9


def test_config_json_has_every_released_key(offline, export16):
    config = json.loads((export16 / "config.json").read_text())
    assert set(RELEASED_KEYS) <= set(config), set(RELEASED_KEYS) - set(config)
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_ouro.OuroConfig",
                                  "AutoModel": "modeling_ouro.OuroModel",
                                  "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert config["layer_types"] == ["full_attention"] * CONFIG.num_hidden_layers
    assert config["rope_theta"] == CONFIG.rope_theta and "rope_parameters" not in config
    assert {k: config[k] for k in CONFIG.to_hf_dict()} == CONFIG.to_hf_dict()
    assert not {"param_dtype", "remat_policy", "attention_impl", "scan_layers"} & set(config)
    for name in pretrained.CODE_FILES:
        assert (export16 / name).read_text() == Path(pretrained.__file__).with_name(name).read_text()

    read = AutoConfig.from_pretrained(export16, trust_remote_code=True, local_files_only=True)
    assert type(read).__name__ == "OuroConfig" and read.model_type == "ouro"
    assert (read.total_ut_steps, read.early_exit_threshold, read.rope_theta, read.head_dim) == (
        CONFIG.total_ut_steps, CONFIG.early_exit_threshold, CONFIG.rope_theta, CONFIG.head_dim)
    assert read.dtype == torch.bfloat16

    generation = GenerationConfig.from_pretrained(export16)
    assert generation.eos_token_id is None  # no tokenizer, not Ouro's vocabulary: ids are ordinary symbols
    assert (generation.bos_token_id, generation.pad_token_id) == (0, 0)
    stop = [tokenizer_lib.IM_END_ID, tokenizer_lib.ENDOFTEXT_ID]
    assert pretrained.generation_config(CONFIG.replace(vocab_size=49152))["eos_token_id"] == stop
    byte_level = tokenizer_lib.load("bytes")
    assert pretrained.generation_config(CONFIG.replace(vocab_size=320), byte_level)["eos_token_id"] == stop


def test_sharded_export(offline, model32, export32, tmp_path):
    limit = 20_000
    out = save_pretrained(model32, tmp_path / "sharded", dtype="float32", max_shard_size="20KB")
    index = json.loads((out / pretrained.INDEX_NAME).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert not (out / "model.safetensors").exists() and len(files) > 2
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert set(index["weight_map"]) == set(hf.hf_names(CONFIG))
    assert set(index["weight_map"].values()) == set(files)
    sizes = {name: 4 * int(np.prod(shape)) for name, shape in hf.hf_shapes(CONFIG).items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for file in files:
        in_file = [n for n, f in index["weight_map"].items() if f == file]
        assert len(in_file) == 1 or sum(sizes[n] for n in in_file) <= limit, file

    assert_params_identical(pure_params(from_pretrained(out)), pure_params(model32))
    sharded, single = load_torch(out).state_dict(), load_torch(export32).state_dict()
    assert set(sharded) == set(single)
    for name, tensor in sharded.items():
        assert torch.equal(tensor, single[name]), name


def test_tokenizer_files(offline, tmp_path, monkeypatch):
    config = tiny(vocab_size=49152)  # the Ouro tokenizer's size
    model = nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0)))
    model = build(config, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), pure_params(model)))
    out = save_pretrained(model, tmp_path / "hf", tokenizer="ouro")
    ours = tokenizer_lib.load("ouro")

    prompts = []  # transformers asks through input() whether to run the exported code
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    theirs = AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=False)
    assert prompts == []
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    assert theirs(text)["input_ids"] == ours.encode(text).ids
    assert theirs.eos_token_id == tokenizer_lib.IM_END_ID
    assert theirs.pad_token_id == tokenizer_lib.ENDOFTEXT_ID
    messages = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer_lib.format_chat(messages))

    with pytest.raises(ValueError, match="49152 tokens, more than the model's vocab_size 128"):
        save_pretrained(build(CONFIG, make_params()), tmp_path / "small", tokenizer="ouro")
    assert not (tmp_path / "small").exists()


def test_auto_map_hub(model32, tmp_path):
    out = save_pretrained(model32, tmp_path / "hub", auto_map="hub")
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "ByteDance/Ouro-1.4B--configuration_ouro.OuroConfig",
        "AutoModel": "ByteDance/Ouro-1.4B--modeling_ouro.OuroModel",
        "AutoModelForCausalLM": "ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM",
    }
    assert not list(out.glob("*.py"))
    with pytest.raises(ValueError, match="auto_map='remote' must be 'local' or 'hub'"):
        save_pretrained(model32, tmp_path / "bad", auto_map="remote")


def test_tensor_mismatches_are_reported_together(export32, tmp_path):
    """A missing, an unexpected and a mis-shaped tensor: one error naming all three."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((export32 / "config.json").read_text())
    with safe_open(export32 / "model.safetensors", framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:100]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        from_pretrained(broken)
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing: model.norm.weight" in message
    assert "1 unexpected: model.layers.0.self_attn.q_norm.weight" in message
    assert "1 with a wrong shape: lm_head.weight [100, 64] (expected [128, 64])" in message


def test_not_an_ouro_config(export32, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    config = json.loads((export32 / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama', not 'ouro'"):
        from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="only 'silu' is supported"):
        from_pretrained(other)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        from_pretrained(other)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        from_pretrained(tmp_path)


def test_existing_output_dir(model32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_pretrained(model32, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="not an earlier export"):  # --overwrite replaces only exports
        save_pretrained(model32, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_pretrained(model32, out)
    (out / "stale.txt").write_text("from the earlier export")
    save_pretrained(model32, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of a private temporary directory
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(model32, empty)  # an existing empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no staging left


def test_failed_export_leaves_nothing(model32, tmp_path, monkeypatch):
    original = hf.to_hf_tensors

    def failing(config, params):
        yield from list(original(config, params))[:3]
        raise OSError("disk full")

    out = tmp_path / "out"
    save_pretrained(model32, out, tokenizer=None)  # an earlier export, which --overwrite may replace
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(hf, "to_hf_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model32, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model32, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def run_dir(params, tmp_path_factory):
    """An ouro_jax run directory: config.json with a `model` key, Orbax params at step 7."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(
        {"model": dataclasses.asdict(CONFIG), "seed": 0, "total_steps": 7}))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(run / "checkpoints" / "7" / "params", jax.tree.map(jnp.asarray, params))
    return run


def test_from_pretrained_run_directory(run_dir, model32):
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "7"):
        loaded = from_pretrained(path)
        assert loaded.config == CONFIG
        assert_params_identical(pure_params(loaded), pure_params(model32))
    half = from_pretrained(run_dir, dtype="bfloat16", remat_policy="full")
    assert half.config == CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
    assert {x.dtype for x in jax.tree.leaves(pure_params(half))} == {jnp.dtype(jnp.bfloat16)}


def run_cli(module, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_cli_round_trip(run_dir, model32, tmp_path):
    exported, imported = tmp_path / "hf", tmp_path / "imported"
    done = run_cli("ouro_jax.convert", "--to=hf", f"--source={run_dir}", f"--output_dir={exported}",
                   "--dtype=float32", "--tokenizer=none")
    assert done.returncode == 0, done.stderr
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "float32"
    done = run_cli("ouro_jax.convert", "--to=run", f"--source={exported}", f"--output_dir={imported}")
    assert done.returncode == 0, done.stderr
    assert (imported / "checkpoints" / "0" / "params").is_dir()
    assert json.loads((imported / "config.json").read_text())["model"] == dataclasses.asdict(CONFIG)
    abstract = pure_params(nnx.eval_shape(lambda: Ouro(CONFIG, rngs=nnx.Rngs(0))))
    assert_params_identical(restore_params(str(imported), abstract), pure_params(model32))

    done = run_cli("ouro_jax.convert", "--to=run", f"--source={exported}", f"--output_dir={imported}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists and is not empty" in done.stderr


def test_cli_bad_input(tmp_path):
    done = run_cli("ouro_jax.convert", "--to=hf", f"--source={tmp_path / 'nowhere'}",
                   f"--output_dir={tmp_path / 'out'}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such directory"]
    assert not (tmp_path / "out").exists()
