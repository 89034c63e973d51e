"""`jaxlm serve` in a subprocess, driven by the real `openai` client: continuous batching gives every request
the tokens `jaxlm generate` gives it alone; cancelled requests free their slots; 400/401/404/429 have
OpenAI's error shape and the server keeps serving; SIGTERM drains the requests in flight."""

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
import httpx  # noqa: E402  (openai's own dependency)
from hf_models import WORDS, save_model, save_tokenizer  # noqa: E402

from jaxlm import cli  # noqa: E402
from jaxlm.inference.generate import Generator, SamplingConfig  # noqa: E402
from jaxlm.inference.load import load_run  # noqa: E402

CONTEXT = 512
KEY = "sekret"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A random Qwen2 model with a word-level tokenizer whose every id is a word, and a 512-token context."""
    root = tmp_path_factory.mktemp("serve")
    src = save_model("qwen2", str(root / "src"), config={"max_position_embeddings": CONTEXT})
    save_tokenizer(src, fill=True)
    run = str(root / "run")
    assert cli.main(["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla"]) == 0
    return run


class Server:
    """`jaxlm serve RUN --port 0 FLAGS` on one CPU device; `url` once it prints where it listens."""

    def __init__(self, run: str, *flags: str, log=None):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "serve", run, "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        line = self.lines.get(timeout=180)
        assert line.startswith("serving"), line
        self.url = line.split(" on ")[1].strip()  # http://127.0.0.1:PORT/v1

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def async_client(self, key=KEY):
        return openai.AsyncOpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url.removesuffix("/v1") + "/metrics").text
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    with open(tmp_path_factory.mktemp("log") / "server.log", "w") as log:
        s = Server(run_dir, "--max-batch", "8", "--max-queue", "64", "--prefill-chunk", "32", "--api-key", KEY,
                   log=log)
        yield s
        s.stop()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 70)))) for _ in range(n)]


def test_32_concurrent_streams_give_the_tokens_of_sequential_generate(server, run_dir):
    texts, limits = prompts(32), [int(k) for k in np.random.default_rng(1).integers(1, 24, 32)]

    async def stream(client, text, limit):
        out, finish = "", None
        async for chunk in await client.completions.create(model="run", prompt=text, max_tokens=limit,
                                                           temperature=0, stream=True):
            out += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return out, finish

    async def all_at_once():
        client = server.async_client()
        return await asyncio.gather(*(stream(client, t, k) for t, k in zip(texts, limits)))

    served = asyncio.run(all_at_once())
    loaded = load_run(run_dir)
    tok = loaded.tokenizer
    generator = Generator(loaded.model, loaded.params, SamplingConfig(max_new_tokens=max(limits)))
    for text, limit, (out, finish) in zip(texts, limits, served):
        tokens = [int(t[0]) for t in generator.stream([[tok.bos_id(), *tok.encode(text)]])][:limit]
        ended = tok.eos_id() in tokens
        tokens = tokens[:tokens.index(tok.eos_id())] if ended else tokens
        assert out == tok.decode(tokens), text
        assert finish == ("stop" if ended else "length")


def test_requests_never_add_a_compiled_program(server):
    """The programs compiled at start (decode widths 1, 2, 4, 8 and prefill buckets 16, 32) are all there is,
    after the 32 streams above and after sampled and greedy requests."""
    from jaxlm.serving.engine import powers_of_two, prefill_buckets

    before = server.metrics()["jaxlm_compiled_programs"]
    assert before == len(powers_of_two(1, 8)) + len(prefill_buckets(32, CONTEXT)) == 6
    client = server.client()
    client.completions.create(model="run", prompt=prompts(1, 5)[0] * 2, max_tokens=5, temperature=0.7, extra_body={"top_k": 5},
                              top_p=0.9, seed=3)
    client.completions.create(model="run", prompt="in", max_tokens=3, temperature=0)
    assert server.metrics()["jaxlm_compiled_programs"] == before


def test_chat_streams_and_whole_answers_agree_and_count_usage(server):
    client = server.client()
    messages = [{"role": "user", "content": "let there be light"}]
    whole = client.chat.completions.create(model="run", messages=messages, max_tokens=12, temperature=0)
    pieces = list(client.chat.completions.create(model="run", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == whole.choices[0].message.content
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 4 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_seeded_sampling_repeats_and_n_choices_differ(server):
    client = server.client()
    ask = lambda: client.completions.create(model="run", prompt="in the beginning", max_tokens=10, temperature=1.0,
                                            seed=7, n=3)
    first, second = ask(), ask()
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert len(set(texts)) > 1


def test_logprobs_are_the_model_distribution(server):
    client = server.client()
    out = client.completions.create(model="run", prompt="god created", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()))  # greedy picks the likeliest
        assert sum(np.exp(v) for v in top.values()) <= 1 + 1e-5
    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "day"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert [len(e.top_logprobs) for e in chat.choices[0].logprobs.content] == [2, 2, 2]


def test_stop_strings_cut_the_text(server):
    client = server.client()
    full = client.completions.create(model="run", prompt="water", max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    stop = words[3]
    cut = client.completions.create(model="run", prompt="water", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_disconnected_client_frees_its_slot(server):
    before = server.metrics()["jaxlm_generated_tokens_total"]
    with httpx.stream("POST", server.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "run", "prompt": "in", "max_tokens": 500, "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())  # the first token has come; hang up
    deadline = time.time() + 30
    while server.metrics()["jaxlm_requests_running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.metrics()["jaxlm_requests_running"] == 0
    assert server.metrics()["jaxlm_generated_tokens_total"] - before < 250  # stopped long before its 500
    assert server.client().completions.create(model="run", prompt="in", max_tokens=2).choices[0].text


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return response.status_code, body["error"]["message"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    post = lambda body, headers=auth, path="/completions": httpx.post(url + path, headers=headers, **body)
    good = {"model": "run", "prompt": "in", "max_tokens": 2}
    assert error_of(post({"json": good}, headers={}))[0] == 401
    assert error_of(post({"json": good}, headers={"Authorization": "Bearer wrong"}))[0] == 401
    assert error_of(httpx.get(url + "/models"))[0] == 401
    cases = {
        "not valid JSON": {"content": b"{bad", "headers": {"content-type": "application/json"}},
        "'max_tokens'": {"json": {**good, "max_tokens": "8"}},
        "unknown field 'foo'": {"json": {**good, "foo": 1}},
        "greater than or equal to 1": {"json": {**good, "max_tokens": 0}},
        "context of 512": {"json": {**good, "prompt": " ".join(["in"] * 600)}},
        "decode slots": {"json": {**good, "n": 9}},
        "missing required field 'prompt'": {"json": {"model": "run"}},
        "no body": {},
        "'temperature'": {"json": {**good, "temperature": 3}},
        "'prompt' is an empty list": {"json": {**good, "prompt": []}},
        "token prompt": {"json": {**good, "prompt": [[5, 999]]}},
    }
    for expected, body in cases.items():
        status, message = error_of(httpx.post(url + "/completions", headers={**auth, **body.pop("headers", {})}, **body))
        assert status == 400 and expected in message, (expected, message)
    chat = {"model": "run", "messages": [{"role": "robot", "content": "hi"}]}
    assert error_of(post({"json": chat}, path="/chat/completions"))[0] == 400
    assert error_of(post({"json": {**good, "model": "gpt-4"}}))[0] == 404

    async def flood():
        async with httpx.AsyncClient() as c:
            bad = [c.post(url + "/completions", headers=auth, content=b'{"model": "run", "prompt": [' + bytes([i]))
                   for i in range(32, 232)]
            return await asyncio.gather(*bad)

    assert {r.status_code for r in asyncio.run(flood())} == {400}
    assert server.client().completions.create(model="run", prompt="in", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="run", prompt="in", max_tokens=-1)


def test_a_full_queue_is_429_and_sigterm_drains_requests_in_flight(run_dir, tmp_path):
    """One slot, one queue place: of 12 simultaneous long requests two are taken and the rest get 429; a
    SIGTERM while they stream still lets both finish (tokens keep coming after it), then exits 0."""
    with open(tmp_path / "server.log", "w") as log:
        s = Server(run_dir, "--max-batch", "1", "--max-queue", "1", "--prefill-chunk", "16", log=log)
    try:
        body = {"model": "run", "prompt": "in", "max_tokens": 500, "temperature": 0, "stream": True}
        arrivals, signalled = {}, []

        def stream(i):
            with httpx.stream("POST", s.url + "/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    r.read()
                    arrivals[i] = error_of(r)
                    return
                arrivals[i] = []
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals[i].append((time.monotonic(), json.loads(line[6:])["choices"][0]))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 60  # the refusals are back and the first tokens are streaming: stop now
        while len(arrivals) < 12 or not any(isinstance(a, list) and a for a in arrivals.values()):
            assert time.monotonic() < deadline, arrivals
            time.sleep(0.01)
        signalled.append(time.monotonic())
        s.proc.send_signal(signal.SIGTERM)
        [t.join(120) for t in threads]
        assert s.proc.wait(60) == 0
        served = [a for a in arrivals.values() if isinstance(a, list)]
        refused = [a for a in arrivals.values() if isinstance(a, tuple)]
        assert len(served) == 2 and len(refused) == 10, arrivals
        assert all(status == 429 and "queue" in message for status, message in refused)
        for chunks in served:
            assert chunks[-1][1]["finish_reason"] == "length"
            assert sum(1 for _, c in chunks if c["text"]) == 500  # each token is one word
        assert max(t for chunks in served for t, _ in chunks) > signalled[0] + 0.05  # drained, not done before
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url.removesuffix("/v1") + "/health")
    finally:
        s.stop()


def test_what_cannot_be_served_fails_at_start_with_one_line(run_dir, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "is not a jaxlm run directory" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", run_dir, "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot listen on 127.0.0.1" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(["serve", run_dir, "--max-batch", "0"])
    assert "--max-batch: 0 is out of range" in capsys.readouterr().err
