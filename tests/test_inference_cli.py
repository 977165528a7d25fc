"""`python -m ouro_jax.inference`: streamed text equals `generate`, token ids in and out for models
without a text tokenizer, and every bad input is one line `error: ...` with exit status 1."""

import dataclasses
import os
import subprocess
import sys

import pytest
from flax import nnx

from ouro_jax import run
from ouro_jax import tokenizer as tok
from ouro_jax.convert.pretrained import save_pretrained
from ouro_jax.inference import generate
from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro


def _save_run(directory, model) -> None:
    """`model` as an ouro_jax run (step 0) that `from_pretrained` loads."""
    run.save_params(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)), step=0)
    run.write_config(directory, {"model": dataclasses.asdict(model.config)})


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ouro_jax.inference", *args], capture_output=True,
                          timeout=300, cwd=cwd, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny model over the Ouro vocabulary (49152 tokens) saved as an ouro_jax run and as a Hugging
    Face directory, and a 4-symbol model (the p-hop demo's vocabulary) saved as a run."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = Ouro(tiny(vocab_size=49152), rngs=nnx.Rngs(1))
    _save_run(root / "run", model)
    save_pretrained(model, root / "hf", dtype="float32", tokenizer="ouro")
    symbols = Ouro(tiny(vocab_size=4), rngs=nnx.Rngs(2))
    _save_run(root / "symbols", symbols)
    return root, model, symbols


@pytest.mark.parametrize("source", ["run", "hf"])
@pytest.mark.slow
def test_streams_text_and_reports_depth(checkpoints, source):
    root, model, _ = checkpoints
    done = _cli(f"--model={root / source}", "--prompt=Hello", "--chat", "--max_new_tokens=5",
                "--exit_threshold=0.9", "--kv_sharing=last")
    assert done.returncode == 0, done.stderr.decode()
    text, report = done.stdout.decode().rsplit("\n\n", 1)
    assert "mean depth" in report and f"of {model.config.total_ut_steps} loops" in report
    tokenizer = tok.load("ouro")
    ids = tok.encode_chat(tokenizer, [{"role": "user", "content": "Hello"}])
    expected = generate(model, [ids], 5, exit_threshold=0.9, kv_sharing="last", stop_tokens=tok.STOP_IDS)
    kept = [int(t) for t in expected.tokens[0, :expected.lengths[0]] if int(t) not in tok.STOP_IDS]
    assert text == tokenizer.decode(kept)


@pytest.mark.slow
def test_prompt_ids_give_token_ids_without_a_tokenizer(checkpoints):
    """A 4-symbol model (which no text tokenizer fits): ids in, the generated ids out, no stop ids
    unless given; with --stop_ids the output ends before the first stop id."""
    root, _, symbols = checkpoints
    prompt = [1, 2, 3, 0, 1, 2]
    expected = [int(t) for t in generate(symbols, [prompt], 8, exit_at_loop=2).tokens[0]]
    done = _cli(f"--model={root / 'symbols'}", "--prompt_ids=" + ",".join(map(str, prompt)),
                "--max_new_tokens=8", "--exit_at_loop=2")
    assert done.returncode == 0, done.stderr.decode()
    ids, report = done.stdout.decode().rsplit("\n\n", 1)
    assert ids == ",".join(map(str, expected)) and "mean depth 2.00 of 4 loops" in report

    stop = expected[3]
    done = _cli(f"--model={root / 'symbols'}", "--prompt_ids=" + ",".join(map(str, prompt)),
                "--max_new_tokens=8", "--exit_at_loop=2", f"--stop_ids={stop}")
    assert done.returncode == 0, done.stderr.decode()
    first_stop = expected.index(stop)
    assert done.stdout.decode().rsplit("\n\n", 1)[0] == ",".join(map(str, expected[:first_stop]))


@pytest.mark.slow
def test_invalid_utf8_prompt_is_one_line(checkpoints, tmp_path):
    root = checkpoints[0]
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"caf\xe9 \xff")
    err = _one_line_error(_cli(f"--model={root / 'run'}", f"--prompt_file={bad}"))
    assert "not valid UTF-8" in err and "0xe9" in err
    err = _one_line_error(_cli(f"--model={root / 'run'}", b"--prompt=caf\xe9"))  # argv bytes, not UTF-8
    assert "--prompt is not valid UTF-8" in err


@pytest.mark.parametrize("args, message", [
    (["--model=/nonexistent", "--prompt=x"], "no such directory"),
    (["--prompt=x"], "--model"),
    (["--model=.", "--prompt=x", "--kv_sharing=first"], "kv_sharing"),
    (["--model=.", "--prompt=x", "--skipped_kv=zero"], "skipped_kv"),
    (["--model=.", "--prompt=x", "--exit_policy=hidden"], "exit_policy"),
    (["--model=."], "exactly one of --prompt, --prompt_file, --prompt_ids"),
    (["--model=.", "--prompt_ids=1,a"], "integer token ids"),
    (["--model=.", "--prompt_ids=1", "--chat"], "need a text prompt"),
])
def test_bad_input_is_one_line_and_exit_code_1(args, message):
    assert message in _one_line_error(_cli(*args))


@pytest.mark.slow
def test_refuses_a_tokenizer_larger_than_the_vocabulary_and_ids_outside_it(checkpoints):
    root = checkpoints[0]
    err = _one_line_error(_cli(f"--model={root / 'symbols'}", "--prompt=hi"))
    assert "more than the model's vocab_size 4" in err and "--prompt_ids" in err
    err = _one_line_error(_cli(f"--model={root / 'symbols'}", "--prompt_ids=1,4"))
    assert "vocab_size=4" in err


@pytest.mark.slow
def test_a_byte_tokenizer_run_is_prompted_by_text_with_its_own_tokenizer(tmp_path):
    """A run of `configs/text.py:cpu` (byte tokenizer, vocab 320) answers a text prompt: the command reads
    the run's own tokenizer instead of Ouro's 49152 tokens."""
    from ouro_jax.train import recipes

    config = recipes.text("cpu")
    model = Ouro(tiny(**config.model.to_dict()), rngs=nnx.Rngs(0))
    run.save_params(tmp_path / "run", nnx.to_pure_dict(nnx.state(model, nnx.Param)), step=0)
    run.write_config(tmp_path / "run", config)
    assert run.tokenizer_of(tmp_path / "run") == "bytes"
    done = _cli(f"--model={tmp_path / 'run'}", "--prompt=In the beginning", "--max_new_tokens=4")
    assert done.returncode == 0, done.stderr.decode()
    tokenizer = tok.load("bytes")
    want = generate(model, [tokenizer.encode("In the beginning", add_special_tokens=False).ids], 4,
                    stop_tokens=tok.STOP_IDS)
    kept = [int(t) for t in want.tokens[0, :want.lengths[0]] if int(t) not in tok.STOP_IDS]
    assert done.stdout.decode().rsplit("\n\n", 1)[0] == tokenizer.decode(kept)


def test_the_tokenizer_of_each_kind_of_model_directory(checkpoints):
    root, _, _ = checkpoints
    assert run.tokenizer_of(root / "hf") == str(root / "hf")  # an export carries its tokenizer.json
    assert run.tokenizer_of(root / "run") == "ouro"  # an imported-style run with no data config
    (root / "task").mkdir(exist_ok=True)
    run.write_config(root / "task", {"model": {}, "data": {"source": "phop", "tokenizer": "ouro"}})
    assert run.tokenizer_of(root / "task") is None  # a synthetic-task run has no text tokenizer

