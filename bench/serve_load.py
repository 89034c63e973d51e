"""Serving under load: `jaxlm serve` (continuous batching) against `jaxlm generate`'s static batching and
Hugging Face `transformers` generate, on one replayed stream of requests.

    JAX_PLATFORMS=cpu python bench/serve_load.py runs/tiny --out serve_load.json
    JAX_PLATFORMS=cpu python bench/serve_load.py runs/tiny --requests 16 --concurrency 1 8 --skip-hf

The workload (the same for the three systems, deterministic per --seed): --requests prompts cut from King James
Bible chapters (encoded with the run's tokenizer, BOS first), of 8-128 tokens, each asking for 16-96 new
tokens (both ranges shrunk to fit a model context under 224 tokens), arriving as a Poisson process at --rate
requests/s. Decoding is greedy with end-of-sequence ignored, so every request gets exactly its max_tokens.

At each concurrency C the arrivals are replayed in real time:
  * jaxlm serve: the server runs as a subprocess (`--port 0 --max-batch B`, its log next to --out). At most C
    requests are in flight; one that arrives while C are in flight waits in the client, in arrival order.
    Requests go to /v1/completions as token lists, streamed, with `ignore_eos` and `logprobs: 0` (so every
    token, even one whose text is empty, comes as its own event).
  * jaxlm static: in-process after the server is stopped (the two never share the cores):
    `Generator.stream` on batches of up to C requests in arrival order. A batch starts once its last member has
    arrived and the previous batch is done, and decodes max(max_tokens) of the batch (rounded up to 16, to
    bound the programs compiled) steps; each request keeps its first max_tokens.
  * transformers: the run exported with `jaxlm convert to-hf` (float32), eager attention, `torch.set_num_threads(2)`,
    batched exactly like jaxlm static (left-padded, `generate(max_new_tokens=min_new_tokens=max(max_tokens))`).
Reported per system and C: output tokens/s (all requests' tokens over the time from the first arrival to the
last token), time to first token (TTFT: first token - arrival, so time spent waiting for a slot or a batch
counts) p50/p99, per-token latency (gaps between consecutive tokens of one request, pooled) p50/p99, and the
wall time. Also whether the served texts of the first requests equal jaxlm static's, and the share of
transformers' tokens equal to jaxlm static's.

Caveats: this measures CPUs (2 cores on the machine it was written on), where a tiny model's step is mostly
overhead, not an accelerator. Compilation is excluded everywhere: the server compiles its programs at start and
gets one warm-up request; jaxlm static compiles every (batch, prompt bucket, length) shape before the timed
replay (that time is reported as compile_s); transformers gets one warm-up call. Timings come from the client's
clock (the server's HTTP, JSON and detokenization are inside them); static batching's are the moments
`Generator.stream` and transformers' streamer hand over each step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PROMPT_RANGE, OUTPUT_RANGE = (8, 128), (16, 96)
LENGTH_STEP = 16  # static batching's decode length is rounded up to this, so few programs are compiled
CHECKED = 4  # requests whose served text is compared with jaxlm static's
SERVER_START_S = 900


# ----------------------------------------------------------------------------------------------- workload

def length_ranges(context: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Prompt and output length ranges, shrunk (same proportions) so the longest prompt plus the longest output
    fits the context: static batches pad every row to both maxima."""
    (p_lo, p_hi), (o_lo, o_hi) = PROMPT_RANGE, OUTPUT_RANGE
    if p_hi + o_hi > context:
        p_hi = max(2, context * p_hi // (p_hi + o_hi))
        o_hi = max(1, context - p_hi)
        p_lo, o_lo = min(p_lo, p_hi), min(o_lo, o_hi)
    return (p_lo, p_hi), (o_lo, o_hi)


def make_workload(tokenizer, context: int, n: int, rate: float, seed: int) -> list[dict]:
    """n requests: {prompt (token ids), max_tokens, arrival (s after the first)}."""
    from jaxlm.data.corpus import bible_chapters
    from jaxlm.inference.generate import prompt_ids

    rng = random.Random(seed)
    chapters = [c.split("\n", 1)[-1] for c in bible_chapters()]
    (p_lo, p_hi), (o_lo, o_hi) = length_ranges(context)
    requests, arrival = [], 0.0
    for i in range(n):
        length = rng.randint(p_lo, p_hi)
        ids = []
        while len(ids) < length:  # a chapter too short for the prompt: draw another
            words = rng.choice(chapters).split(" ")
            start = rng.randrange(len(words))
            ids = prompt_ids(tokenizer, " ".join(words[start:start + 2 * length]))
        if i:
            arrival += rng.expovariate(rate)
        requests.append({"prompt": ids[:length], "max_tokens": rng.randint(o_lo, o_hi), "arrival": arrival})
    return requests


# ------------------------------------------------------------------------------------------------ metrics

def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(system: str, c: int, requests: list[dict], records: list[dict]) -> dict:
    """records[i]: {"start": the replay's t0, "stamps": token times} for requests[i] (perf_counter seconds)."""
    t0 = records[0]["start"]
    ttft = [r["stamps"][0] - (t0 + q["arrival"]) for q, r in zip(requests, records)]
    gaps = np.concatenate([np.diff(r["stamps"]) for r in records])
    tokens = sum(len(r["stamps"]) for r in records)
    span = max(r["stamps"][-1] for r in records) - (t0 + requests[0]["arrival"])
    short = [i for i, (q, r) in enumerate(zip(requests, records)) if len(r["stamps"]) != q["max_tokens"]]
    if short:
        print(f"  warning: {system} C={c}: requests {short[:8]} did not get exactly max_tokens tokens", flush=True)
    return {"system": system, "concurrency": c, "output_tokens": tokens, "out_tok_s": tokens / span,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "token_p50_ms": 1e3 * percentile(gaps, 50), "token_p99_ms": 1e3 * percentile(gaps, 99), "wall_s": span}


def print_table(rows: list[dict]) -> None:
    print(f"{'system':>14} {'C':>3} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'tok p50 ms':>11} {'tok p99 ms':>11} {'wall s':>8}")
    for r in rows:
        print(f"{r['system']:>14} {r['concurrency']:>3} {r['out_tok_s']:10.1f} {r['ttft_p50_ms']:12.1f} "
              f"{r['ttft_p99_ms']:12.1f} {r['token_p50_ms']:11.2f} {r['token_p99_ms']:11.2f} {r['wall_s']:8.2f}")


# -------------------------------------------------------------------------------------------- jaxlm serve

def start_server(run: str, max_batch: int, log_path: str) -> tuple[subprocess.Popen, str, str]:
    """Starts `jaxlm serve` on a free port; returns (process, base URL ending in /v1, model name)."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "serve", run, "--port", "0",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")] + [lines.put(None)],
                     daemon=True).start()
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith("serving ") and " on http" in line:
            name = line.split(" as '", 1)[1].split("' on ", 1)[0]
            return proc, line.rsplit(" on ", 1)[1].strip(), name
    stop_server(proc)
    with open(log_path) as f:
        tail = f.read()[-3000:]
    raise SystemExit(f"jaxlm serve did not start (exit code {proc.returncode}); its log {log_path} ends:\n{tail}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def stream_one(client, url: str, model: str, request: dict) -> tuple[list[float], str]:
    """One streamed completion: the arrival time of each token, and the text."""
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0.0,
            "stream": True, "ignore_eos": True, "logprobs": 0}
    stamps, text = [], []
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            choice = event["choices"][0]
            count = len((choice.get("logprobs") or {}).get("tokens") or [])
            stamps += [time.perf_counter()] * count
            text.append(choice["text"])
    return stamps, "".join(text)


async def replay_served(url: str, model: str, requests: list[dict], c: int) -> list[dict]:
    """Replays the arrivals with at most c requests in flight; waiting ones go in arrival order."""
    import httpx

    slots = asyncio.Semaphore(c)
    records: list[dict] = [{} for _ in requests]

    async def run(i: int, client) -> None:
        try:
            stamps, text = await stream_one(client, url, model, requests[i])
            records[i].update(stamps=stamps, text=text)
        finally:
            slots.release()

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        t0, tasks = time.perf_counter(), []
        for i, request in enumerate(requests):
            await asyncio.sleep(max(0.0, t0 + request["arrival"] - time.perf_counter()))
            await slots.acquire()  # one acquirer at a time: this loop, so the order is the arrival order
            records[i]["start"] = t0
            tasks.append(asyncio.create_task(run(i, client)))
        await asyncio.gather(*tasks)
    return records


def bench_served(args, requests: list[dict], log_path: str) -> tuple[list[dict], list[str]]:
    print(f"[serve] starting jaxlm serve --max-batch {args.max_batch} (log: {log_path})", flush=True)
    start = time.perf_counter()
    proc, url, model = start_server(args.run, args.max_batch, log_path)
    rows, texts = [], []
    try:
        print(f"[serve] ready at {url} as {model!r} after {time.perf_counter() - start:.1f}s; warm-up request",
              flush=True)
        asyncio.run(replay_served(url, model, [dict(requests[0], arrival=0.0)], 1))
        for c in args.concurrency:
            print(f"[serve] replaying {len(requests)} requests at concurrency {c}", flush=True)
            records = asyncio.run(replay_served(url, model, requests, c))
            rows.append(summarize("jaxlm serve", c, requests, records))
            texts = texts or [r["text"] for r in records[:CHECKED]]
    finally:
        stop_server(proc)
    print(f"[serve] server stopped (exit code {proc.returncode})", flush=True)
    return rows, texts


# ------------------------------------------------------------------------------------------ static batches

def batches(requests: list[dict], c: int) -> list[list[int]]:
    return [list(range(b, min(b + c, len(requests)))) for b in range(0, len(requests), c)]


def decode_length(requests: list[dict], batch: list[int], context: int, step: int = LENGTH_STEP) -> int:
    """A static batch's decode steps: its longest max_tokens rounded up to `step`, within the context."""
    longest = max(requests[i]["max_tokens"] for i in batch)
    room = context - max(len(requests[i]["prompt"]) for i in batch)
    return max(longest, min(-(-longest // step) * step, room))


def replay_static(requests: list[dict], c: int, decode) -> list[dict]:
    """Replays the arrivals in batches of up to c: `decode(batch)` runs one batch and returns (tokens (B, K),
    stamps (K,)); each request keeps its first max_tokens of them."""
    records: list[dict] = [{} for _ in requests]
    t0 = time.perf_counter()
    for batch in batches(requests, c):
        time.sleep(max(0.0, t0 + requests[batch[-1]]["arrival"] - time.perf_counter()))
        tokens, stamps = decode(batch)
        for row, i in enumerate(batch):
            m = requests[i]["max_tokens"]
            records[i] = {"start": t0, "stamps": list(stamps[:m]), "tokens": [int(t) for t in tokens[row, :m]]}
    return records


def bench_static(args, requests: list[dict]) -> tuple[list[dict], list[dict], float]:
    """jaxlm static rows, the records of the first concurrency (for the checks) and the compile time."""
    from jaxlm.core.config import SamplingConfig
    from jaxlm.inference.generate import Generator
    from jaxlm.inference.load import load_run

    print("[static] loading the run", flush=True)
    run = load_run(args.run)
    context = run.config.model.max_seq_len
    generators: dict[int, Generator] = {}

    def decode(batch: list[int], new_tokens: int | None = None, steps: int | None = None):
        k = new_tokens or decode_length(requests, batch, context)
        if k not in generators:
            generators[k] = Generator(run.model, run.params, SamplingConfig(max_new_tokens=k, temperature=0.0),
                                      run.mesh)
        tokens, stamps = [], []
        for step in generators[k].stream([requests[i]["prompt"] for i in batch]):
            tokens.append(step)
            stamps.append(time.perf_counter())
            if steps and len(tokens) >= steps:
                break
        return np.stack(tokens, axis=1), stamps

    start, shapes = time.perf_counter(), set()
    for c in args.concurrency:  # prefill and step compile on a batch's first two tokens
        for batch in batches(requests, c):
            shape = static_shape(requests, batch, context)
            if shape not in shapes:
                shapes.add(shape)
                decode(batch, steps=2)
    compile_s = time.perf_counter() - start
    print(f"[static] compiled {len(shapes)} (batch, prompt bucket, length) shapes in {compile_s:.1f}s", flush=True)
    return (*replay_batched("jaxlm static", args.concurrency, requests, decode), compile_s)


def replay_batched(system: str, concurrency: list[int], requests: list[dict], decode) -> tuple[list[dict], list[dict]]:
    """Each concurrency's summary row, and the records of the first (for the token checks)."""
    rows, first = [], None
    for c in concurrency:
        print(f"[{system}] replaying {len(requests)} requests at concurrency {c}", flush=True)
        records = replay_static(requests, c, decode)
        rows.append(summarize(system, c, requests, records))
        first = first or records
    return rows, first


def static_shape(requests: list[dict], batch: list[int], context: int) -> tuple[int, int, int]:
    """(batch, padded prompt, new tokens): what `Generator.stream` compiles a program for."""
    from jaxlm.inference.generate import PROMPT_BUCKET

    k = decode_length(requests, batch, context)
    p = max(len(requests[i]["prompt"]) for i in batch)
    return len(batch), max(p, min(-(-p // PROMPT_BUCKET) * PROMPT_BUCKET, context - k)), k


# ------------------------------------------------------------------------------------------- transformers

def bench_hf(args, requests: list[dict], pad_id: int) -> tuple[list[dict], list[dict]]:
    import torch
    from transformers import AutoModelForCausalLM
    from decode import Clock  # bench/decode.py, beside this script: the same step clock as the decode benchmark

    from jaxlm import cli

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        print(f"[hf] exporting the run to {hf_dir}", flush=True)
        if cli.main(["convert", "to-hf", args.run, hf_dir, "--dtype", "float32"]) != 0:
            raise SystemExit("jaxlm convert to-hf failed")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()

    def decode(batch: list[int]):
        prompts = [requests[i]["prompt"] for i in batch]
        k = max(requests[i]["max_tokens"] for i in batch)
        p = max(len(x) for x in prompts)
        ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(prompts):
            ids[row, p - len(x):] = torch.tensor(x)
            mask[row, p - len(x):] = 1
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=None, streamer=clock)
        return out[:, p:].numpy(), clock.stamps[1:]

    print("[hf] warm-up call", flush=True)
    decode(batches(requests, max(args.concurrency))[0])
    return replay_batched("transformers", args.concurrency, requests, decode)


# ------------------------------------------------------------------------------------------------- main

def checks(tokenizer, static: list[dict], served_texts: list[str], hf: list[dict] | None) -> dict:
    out = {}
    if served_texts:
        same = [tokenizer.decode(static[i]["tokens"]) == t for i, t in enumerate(served_texts)]
        out["served_text_equals_static"] = same
        print(f"check: served text == jaxlm static text for the first {len(same)} requests: {same}")
    if hf is not None:
        pairs = [(a, b) for s, h in zip(static, hf) for a, b in zip(s["tokens"], h["tokens"])]
        out["hf_token_agreement"] = float(np.mean([a == b for a, b in pairs]))
        print(f"check: transformers tokens equal to jaxlm static's: {out['hf_token_agreement']:.1%}")
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a jaxlm run directory (the tiny run for the note)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0,
                        help="Poisson arrivals per second (default 50: above what 32 slots finish on CPU, so "
                             "concurrency 32 stays busy; at low concurrency requests queue in the client)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=32, help="jaxlm serve's decode slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    parser.add_argument("--out", default="serve_load.json", help="the JSON results (default serve_load.json)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jaxlm.core import overrides
    from jaxlm.data import tokenizer as tokenizer_lib

    config = overrides.load([os.path.join(args.run, "config.json")])
    tokenizer = tokenizer_lib.load_for_run(args.run)
    context = config.model.max_seq_len
    requests = make_workload(tokenizer, context, args.requests, args.rate, args.seed)
    lengths = [len(r["prompt"]) for r in requests], [r["max_tokens"] for r in requests]
    print(f"[workload] {len(requests)} requests over {requests[-1]['arrival']:.2f}s (Poisson, {args.rate:g}/s); "
          f"prompts {min(lengths[0])}-{max(lengths[0])} tokens, outputs {min(lengths[1])}-{max(lengths[1])} "
          f"tokens ({sum(lengths[1])} in all); context {context}", flush=True)
    log_path = os.path.splitext(args.out)[0] + ".server.log"
    served_rows, served_texts = bench_served(args, requests, log_path)
    static_rows, static, compile_s = bench_static(args, requests)
    hf_rows, hf = ([], None) if args.skip_hf else bench_hf(args, requests, max(tokenizer.pad_id(), 0))
    rows = [r for c in args.concurrency for r in served_rows + static_rows + hf_rows if r["concurrency"] == c]
    print()
    print_table(rows)
    print(f"(compile excluded; jaxlm static compiled for {compile_s:.1f}s first)")
    result = {"settings": {k: v for k, v in vars(args).items()}, "context": context, "static_compile_s": compile_s,
              "results": rows, "checks": checks(tokenizer, static, served_texts, hf),
              "workload": [{"prompt_tokens": len(r["prompt"]), "max_tokens": r["max_tokens"],
                            "arrival_s": r["arrival"]} for r in requests]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
