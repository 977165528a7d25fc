"""The OpenAI-compatible server (`ouro_jax.serve`) in-process on 127.0.0.1 (uvicorn in a thread, an
ephemeral port) with the real `openai` client, over a tiny random model exported with the byte tokenizer:
completions and chat against `generate` and a float64 recomputation (`oracle.py`), streaming, n > 1, stop
strings, echo + logprobs, every bad-input case (4xx in OpenAI's format, nothing queued, still serving),
a client disconnect freeing its slot, auth, and SIGTERM drain of `python -m ouro_jax.serve`."""

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import uvicorn

from ouro_jax import tokenizer as tok
from ouro_jax.convert.pretrained import from_pretrained
from ouro_jax.inference import generate
from ouro_jax.inference.engine import SamplingParams
from ouro_jax.serve.app import token_string
from ouro_jax.serve.backend import StaticBatchBackend
from ouro_jax.serve.server import build

import oracle
from util import exported_gated_model, hf_state_dict

CONTEXT = 128
NAME = "tiny"
STOP_IDS = tok.STOP_IDS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Ouro over the byte tokenizer's 259 ids, exported with its tokenizer."""
    return exported_gated_model(tmp_path_factory.mktemp("serve") / "tiny", vocab_size=259, context=CONTEXT,
                                tokenizer=tok.byte_tokenizer())


@contextlib.contextmanager
def serving(app):
    """uvicorn serving `app` on 127.0.0.1 in a thread -> its base URL; stopped (drained) on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server(model_dir):
    """(base URL, runner, model) of a server with 2 slots and a 128-token context."""
    app, runner = build(model_dir, max_slots=2, max_context=CONTEXT, model_name=NAME)
    with serving(app) as url:
        yield url, runner, from_pretrained(model_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def raw(url: str, method: str, path: str, body: bytes | str | dict | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    """One HTTP request -> (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    data = json.dumps(body) if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read() or b"null")
    conn.close()
    return status, payload


def reference(model, prompt, max_tokens):
    """Greedy tokens of `generate` (stopping at <|im_end|> / <|endoftext|>) and whether a stop token ended
    them."""
    out = generate(model, np.asarray([prompt]), max_tokens, stop_tokens=STOP_IDS)
    tokens = [int(t) for t in out.tokens[0, :out.lengths[0]]]
    return tokens, bool(tokens and tokens[-1] in STOP_IDS)


def float64_logprobs(model, ids, exit_threshold=None):
    """log p(ids[s + 1] | ids[:s + 1]) for s = 0..len - 2 and the argmax ids, in float64 from the
    independent oracle forward, at the last loop or each position's Q-exit loop."""
    logits, gates = oracle.forward(hf_state_dict(model), model.config.to_hf_dict(), np.asarray([ids]))
    logits, gates = logits[:, 0], gates[:, 0]  # [T, S, V], [T, S]
    if exit_threshold is None:
        loop = np.full(len(ids), logits.shape[0] - 1)
    else:
        cdf = np.cumsum(oracle.exit_pdf(gates), axis=0)
        reached = cdf[:-1] >= exit_threshold
        loop = np.where(reached.any(0), reached.argmax(0), logits.shape[0] - 1)
    chosen = logits[loop, np.arange(len(ids))]  # [S, V]
    logp = chosen - chosen.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]], logp.argmax(-1)[:-1], loop


# --- fast: no generation -------------------------------------------------------------------------------
@pytest.mark.slow
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert raw(server[0], "GET", "/health") == (200, {"status": "ok"})


BAD = [
    ("negative max_tokens", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -1}, 400),
    ("absurd max_tokens", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 10 ** 9}, 400),
    ("max_tokens 0 without echo", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400),
    ("prompt over the context", "/v1/completions", {"model": NAME, "prompt": "x" * CONTEXT}, 400),
    ("one of two prompts over the context", "/v1/completions",
     {"model": NAME, "prompt": ["hi", "x" * CONTEXT], "max_tokens": 4}, 400),
    ("token id out of the vocabulary", "/v1/completions", {"model": NAME, "prompt": [5, 259]}, 400),
    ("negative token id", "/v1/completions", {"model": NAME, "prompt": [-1, 5]}, 400),
    ("empty prompt", "/v1/completions", {"model": NAME, "prompt": []}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("malformed JSON", "/v1/completions", '{"model": "tiny", "prompt": ', 400),
    ("not an object", "/v1/completions", "[1, 2]", 400),
    ("missing prompt", "/v1/completions", {"model": NAME}, 400),
    ("max_tokens as a string", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "5"}, 400),
    ("temperature as a string", "/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"},
     400),
    ("prompt as a number", "/v1/completions", {"model": NAME, "prompt": 5}, 400),
    ("mixed prompt list", "/v1/completions", {"model": NAME, "prompt": ["hi", [5, 6]]}, 400),
    ("n = 0", "/v1/completions", {"model": NAME, "prompt": "hi", "n": 0}, 400),
    ("top_p = 0", "/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400),
    ("negative temperature", "/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400),
    ("logprobs above 5", "/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 9}, 400),
    ("exit_threshold above 1", "/v1/completions", {"model": NAME, "prompt": "hi", "exit_threshold": 2}, 400),
    ("stream as a string", "/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400),
    ("chat without messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("chat max_tokens 0", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ("chat message without content", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}]},
     400),
    ("chat unknown role", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat over the context", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "x" * CONTEXT}]}, 400),
    ("chat unknown model", "/v1/chat/completions",
     {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
]


@pytest.mark.parametrize("path, body, status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_and_changes_nothing(server, path, body, status):
    url, runner, _ = server
    got, payload = raw(url, "POST", path, body)
    assert got == status, payload
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert runner.in_flight == 0 and not runner.backend.has_work()
    assert raw(url, "GET", "/health")[0] == 200
    assert raw(url, "GET", "/v1/models")[0] == 200


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="x" * CONTEXT, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=4)
    assert raw(client.base_url.__str__().removesuffix("/v1/"), "GET", "/health")[0] == 200


def test_unknown_path_is_404(server):
    status, payload = raw(server[0], "GET", "/v1/engines")
    assert status == 404 and payload["error"]["message"]


def test_api_key(model_dir):
    app, _ = build(model_dir, max_slots=1, max_context=CONTEXT, model_name=NAME, api_key="sekret")
    with serving(app) as url:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            status, payload = raw(url, "GET", "/v1/models", headers=headers)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
            status, _ = raw(url, "POST", "/v1/completions", {"model": NAME, "prompt": "hi"}, headers)
            assert status == 401
        assert raw(url, "GET", "/health")[0] == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="other", max_retries=0).models.list()


# --- generation (compiles `generate` programs: slow) ------------------------------------------------
@pytest.mark.slow
def test_completions_equal_generate(server, client):
    _, _, model = server
    tokenizer = tok.byte_tokenizer()
    for prompt in ("Hello there", "A"):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        tokens, stopped = reference(model, ids, 12)
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        shown = tokens[:-1] if stopped else tokens
        assert out.choices[0].text == tokenizer.decode(shown, skip_special_tokens=False)
        assert out.choices[0].finish_reason == ("stop" if stopped else "length")
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(tokens)
        assert out.usage.model_extra["mean_loops_per_token"] == model.config.total_ut_steps  # full depth
    # Token ids in, a batch of two prompts: each choice as `generate` alone.
    prompts = [[5, 6, 7, 8], [40, 41]]
    out = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0)
    for choice, prompt in zip(out.choices, prompts, strict=True):
        tokens, stopped = reference(model, prompt, 6)
        assert choice.text == tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=False)


@pytest.mark.slow
def test_streaming_n_seed_and_stop(client):
    whole = client.completions.create(model=NAME, prompt="Stream me", max_tokens=20, temperature=0)
    text = whole.choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="Stream me", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # A stop string from the middle of the greedy text: the text ends before it.
    stop = text[4:6]
    cut = client.completions.create(model=NAME, prompt="Stream me", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="Stream me", max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]
    # n samples: n choices, reproducible under a seed.
    runs = [client.completions.create(model=NAME, prompt="Sample", max_tokens=8, temperature=1.0, n=3,
                                      seed=7) for _ in range(2)]
    assert [c.index for c in runs[0].choices] == [0, 1, 2]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]
    assert len({c.text for c in runs[0].choices}) > 1


@pytest.mark.slow
def test_chat(server, client):
    _, _, model = server
    tokenizer = tok.byte_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = tok.encode_chat(tokenizer, messages)
    tokens, stopped = reference(model, ids, 10)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    expected = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=False)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


@pytest.mark.slow
@pytest.mark.parametrize("exit_threshold", [None, 0.5])
def test_echo_logprobs_equal_a_float64_recomputation(server, client, exit_threshold):
    _, _, model = server
    prompt = [5, 72, 101, 108, 108, 111, 32, 119, 111]
    extra = {} if exit_threshold is None else {"exit_threshold": exit_threshold}
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                    logprobs=2, extra_body=extra)
    lp = out.choices[0].logprobs
    expected, argmax, loop = float64_logprobs(model, prompt, exit_threshold)
    if exit_threshold is not None:
        assert len(set(loop.tolist())) > 1  # the positions really exit at different loops
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(prompt)], expected, atol=2e-5)
    tokenizer = tok.byte_tokenizer()
    for s, top in enumerate(lp.top_logprobs[1:len(prompt)]):
        assert len(top) == 2
        assert max(top, key=top.get) == token_string(tokenizer, int(argmax[s]))
    assert lp.tokens[:len(prompt)] == [token_string(tokenizer, t) for t in prompt]
    assert out.choices[0].text.startswith(tokenizer.decode(prompt, skip_special_tokens=False))
    assert len(lp.token_logprobs) == len(prompt) + 1  # then the generated token
    # max_tokens 0 with echo scores the prompt alone (no generation).
    only = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                     extra_body=extra)
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(prompt)]
    assert only.usage.completion_tokens == 0


@pytest.mark.slow
def test_static_backend_logprobs_equal_a_float64_recomputation(server):
    _, _, model = server
    backend = StaticBatchBackend(model, max_slots=2, max_context=CONTEXT, logprobs=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    ids = [backend.add_request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, (6, 4), strict=True)]
    events = []
    while backend.has_work():  # bounded: one batch
        events += backend.step()
    for rid, prompt, n in zip(ids, prompts, (6, 4), strict=True):
        mine = [e for e in events if e.request_id == rid]
        assert len(mine) == n and mine[-1].finish_reason == "length"
        assert [e.finish_reason for e in mine[:-1]] == [None] * (n - 1)
        assert [e.exit_loop for e in mine] == [model.config.total_ut_steps] * n
        whole = prompt + [e.token for e in mine]
        expected, argmax, _ = float64_logprobs(model, whole)
        np.testing.assert_allclose([e.logprob for e in mine], expected[len(prompt) - 1:], atol=2e-5)
        assert [e.token for e in mine] == argmax[len(prompt) - 1:].tolist()  # greedy


@pytest.mark.slow
def test_disconnect_frees_the_slot(server, client):
    url, runner, _ = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": "Long one", "max_tokens": 100, "temperature": 0, "stream": True}),
        headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # a first token came
    assert runner.in_flight == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 120
    while runner.in_flight:  # the server saw the disconnect and aborted the request
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)
    out = client.completions.create(model=NAME, prompt="Next", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ouro_jax.serve", f"--model={model_dir}", f"--port={port}",
                             "--max_slots=2", f"--max_context={CONTEXT}", f"--served_model_name={NAME}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            with contextlib.suppress(OSError):
                if raw(url, "GET", "/health")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": NAME, "prompt": "Drain me", "max_tokens": 40, "temperature": 0, "stream": True}),
            headers={"content-type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert proc.wait(timeout=120) == 0
        with pytest.raises(OSError):
            raw(url, "GET", "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_lm_eval_local_completions_equals_the_native_model(server, model_dir, tmp_path):
    """lm-eval's `local-completions` against the server (loglikelihood through echo + logprobs, greedy
    generate_until) gives the numbers of lm-eval through the native "ouro_jax" model."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager
    from test_lm_eval import DOCS, write_tasks

    from ouro_jax.evaluate.lm_eval import OuroLM

    # A stop string the model really produces: two tokens from its first greedy continuation.
    native = OuroLM(pretrained=model_dir, batch_size=2)
    (uncut,) = native.generate_until([Instance("generate_until", {}, (DOCS[0]["question"],
                                                                       {"until": [], "max_gen_toks": 8}), 0)])
    stop = uncut[3:5]
    assert stop and stop in uncut[3:]
    tasks = [t for t in write_tasks(tmp_path, stop) if t != "ouro_rolling"]  # windows differ by design
    manager = TaskManager(include_path=str(tmp_path))
    args = {"ouro_jax": f"pretrained={model_dir},batch_size=2",
            "local-completions": f"base_url={server[0]}/v1/completions,model={NAME},"
                                 f"tokenizer_backend=huggingface,tokenizer={model_dir},max_length={CONTEXT},num_concurrent=1,max_retries=1"}
    results = {name: lm_eval.simple_evaluate(model=name, model_args=a, tasks=tasks, task_manager=manager,
                                             log_samples=True, bootstrap_iters=0) for name, a in args.items()}
    ours, theirs = results["local-completions"], results["ouro_jax"]
    for task in tasks:
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            if task == "ouro_gen":
                assert a["filtered_resps"] == b["filtered_resps"]
            else:
                np.testing.assert_allclose(np.asarray(a["filtered_resps"], float),
                                           np.asarray(b["filtered_resps"], float), atol=1e-4)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                got = ours["results"][task][metric]
                assert got == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
    assert theirs["samples"]["ouro_gen"][0]["filtered_resps"] == [uncut[:uncut.index(stop)]]
