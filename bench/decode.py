"""Decoding speed: jaxlm's KV-cache generator against Hugging Face `transformers` generate on the CPU.

    python bench/decode.py                        # the tiny preset's shape, 64 new tokens, batch 1 and 8
    python bench/decode.py tiny model.num_layers=8 --new-tokens 128

Both run the same weights (jaxlm's random init exported with `jaxlm.hf.exporter`) on the same prompts
(left-padded, different lengths), greedily, with every sequence forced to the full length. Reported per
batch size: time to first token (prefill + first sample), decode tokens/s after the first token, and
whether the two produced the same tokens. Also the parameter memory in float32, int8 and int4, and
jaxlm's decode speed with int8 weights. Everything is measured after one warm-up call (compilation and
torch's first-call overheads excluded), median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def jaxlm_decode(model, params, prompts, new_tokens: int, repeats: int) -> dict:
    from jaxlm.inference.generate import Generator, SamplingConfig

    gen = Generator(model, params, SamplingConfig(max_new_tokens=new_tokens))
    list(gen.stream(prompts))  # compile prefill and step
    ttfts, rates, out = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, stamps = [], []
        for step in gen.stream(prompts):
            tokens.append(step)
            stamps.append(time.perf_counter())
        ttfts.append(stamps[0] - start)
        rates.append(len(prompts) * (new_tokens - 1) / (stamps[-1] - stamps[0]))
        out = np.stack(tokens, axis=1)
    return {"ttft_ms": 1e3 * statistics.median(ttfts), "decode_tok_s": statistics.median(rates), "tokens": out}


class Clock:
    """A `transformers` streamer (generate only calls put and end) that records when generate hands over each
    step's tokens; the first `put` is the prompt."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(hf_dir: str, prompts, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    p = max(len(x) for x in prompts)
    ids = torch.zeros((len(prompts), p), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    ttfts, rates, out = [], [], None
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        for _ in range(repeats):
            clock = Clock()
            start = time.perf_counter()
            result = model.generate(ids, streamer=clock, **kwargs)
            first, last = clock.stamps[1], clock.stamps[-1]
            ttfts.append(first - start)
            rates.append(len(prompts) * (new_tokens - 1) / (last - first))
            out = result[:, p:].numpy()
    return {"ttft_ms": 1e3 * statistics.median(ttfts), "decode_tok_s": statistics.median(rates), "tokens": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="*", default=["tiny"], help="preset and overrides (default: tiny)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", help="use this trained run's weights and config instead of a random init")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import jax.numpy as jnp

    from jaxlm.core import overrides
    from jaxlm.core.sharded_init import strip_boxes
    from jaxlm.hf import families
    from jaxlm.hf.exporter import write_checkpoint
    from jaxlm.model import quantize
    from jaxlm.model.transformer import Transformer

    if args.run_dir:  # trained weights: greedy choices are clear-cut, so token agreement is meaningful
        from jaxlm.inference.load import load_run

        run = load_run(args.run_dir)
        config, model, params = run.config, run.model, run.params
    else:
        config = overrides.load(args.config + ["model.dtype='float32'", "model.attention='xla'"])
        model = Transformer(config.model)
        params = jax.jit(lambda: strip_boxes(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])()
    rng = np.random.default_rng(0)
    all_prompts = [rng.integers(3, config.model.vocab_size, size=n).tolist() for n in (40, 57, 33, 64, 48, 61, 36, 52)]
    with tempfile.TemporaryDirectory() as hf_dir:
        write_checkpoint(params, config.model, hf_dir, "float32", progress=False)
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump(families.hf_config(config.model, None, "float32"), f)
        print(f"model: {config.name} shape, d_model={config.model.d_model}, layers={config.model.num_layers}, "
              f"vocab={config.model.vocab_size}; float32; {args.new_tokens} new tokens; prompts of 33-64 tokens")
        print(f"{'batch':>5} {'engine':>14} {'TTFT ms':>9} {'decode tok/s':>13} {'same tokens':>12}")
        int8 = quantize.quantize_params(params, "int8")
        for b in (int(x) for x in args.batch_sizes.split(",")):
            prompts = all_prompts[:b]
            ours = jaxlm_decode(model, params, prompts, args.new_tokens, args.repeats)
            hf = hf_decode(hf_dir, prompts, args.new_tokens, args.repeats)
            q8 = jaxlm_decode(model, int8, prompts, args.new_tokens, args.repeats)
            agree = float(np.mean(ours["tokens"] == hf["tokens"]))
            for name, r in (("jaxlm", ours), ("transformers", hf), ("jaxlm int8", q8)):
                same = f"{agree:.1%}" if name == "transformers" else ""
                print(f"{b:>5} {name:>14} {r['ttft_ms']:9.1f} {r['decode_tok_s']:13.1f} {same:>12}")
            print(f"{b:>5} {'ratio':>14} {hf['ttft_ms'] / ours['ttft_ms']:8.2f}x "
                  f"{ours['decode_tok_s'] / hf['decode_tok_s']:12.2f}x   (jaxlm vs transformers; >1 is faster)")
    mib = lambda tree: quantize.nbytes(tree) / 2**20
    print(f"params: float32 {mib(params):.2f} MiB, int8 {mib(int8):.2f} MiB, "
          f"int4 {mib(quantize.quantize_params(params, 'int4')):.2f} MiB "
          f"(embedding stays float: {mib(params['embed']):.2f} MiB of it)")


if __name__ == "__main__":
    sys.exit(main())
