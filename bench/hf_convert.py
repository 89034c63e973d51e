"""Hugging Face import/export speed: seconds, MB/s and peak host memory, for a random model of a published
shape (default: Qwen2-0.5B, 494M parameters, saved in bfloat16 like the published checkpoint).

    python bench/hf_convert.py                        # Qwen2-0.5B shape, bfloat16 safetensors, 1 GB shards
    python bench/hf_convert.py --shape small          # a 30M-parameter model, for a quick check
    python bench/hf_convert.py --hf-dtype float32 --export-dtype float32

Phases, each in its own process so that its peak RSS is its own:
  make     build the random model with transformers and save_pretrained (not timed as jaxlm work)
  load     stream the safetensors into sharded jax arrays (importer.load_params, what model.init_from uses)
  convert  `jaxlm convert from-hf`: load + fresh optimizer state + Orbax checkpoint + tokenizer files
  export   `jaxlm convert to-hf`: restore the params + write safetensors
MB/s counts the safetensors bytes read or written. Needs torch and transformers (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
}


def save_byte_tokenizer(directory: str) -> None:
    """A byte-level tokenizer.json (256 byte tokens + end of text): a run directory needs a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(directory, "tokenizer.json"))


def dir_bytes(directory: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(suffix))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def phase(args) -> dict:
    work = args.work
    hf_dir, run_dir, out_dir = (os.path.join(work, n) for n in ("hf", "run", "out"))
    if args.phase == "make":
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.Qwen2Config(**SHAPES[args.shape])
        with torch.device("cpu"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.hf_dtype))
        model.save_pretrained(hf_dir, max_shard_size="1GB")
        save_byte_tokenizer(hf_dir)
        return {"params": sum(p.numel() for p in model.parameters()), "hf_bytes": dir_bytes(hf_dir)}
    import jax

    from jaxlm.core.config import MeshConfig, ModelConfig
    from jaxlm.core.mesh import make_mesh
    from jaxlm.conversion import hf_runs
    from jaxlm.hf import families, importer

    t0 = time.perf_counter()
    if args.phase == "load":
        mesh = make_mesh(MeshConfig())
        config = families.model_config(importer.read_config(hf_dir), ModelConfig())
        with jax.set_mesh(mesh):
            params = importer.load_params(hf_dir, config, mesh, progress=False)
        jax.block_until_ready(params)
        moved = dir_bytes(hf_dir)
    elif args.phase == "convert":
        hf_runs.from_hf(hf_dir, run_dir)
        moved = dir_bytes(hf_dir)
    else:
        hf_runs.to_hf(run_dir, out_dir, args.export_dtype)
        moved = dir_bytes(out_dir)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "MB/s": moved / seconds / 1e6, "bytes": moved}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    p.add_argument("--hf-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--export-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--work", help="scratch directory (default: a temporary one, deleted at the end)")
    p.add_argument("--phase", choices=("make", "load", "convert", "export"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:  # a child process: one phase, one JSON line
        result = phase(args)
        result["peak_rss_gib"] = peak_rss_gib()
        print(json.dumps(result))
        return
    work = args.work or tempfile.mkdtemp(prefix="jaxlm-hf-bench-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    results = {}
    try:
        for name in ("make", "load", "convert", "export"):
            cmd = [sys.executable, __file__, "--phase", name, "--work", work, "--shape", args.shape,
                   "--hf-dtype", args.hf_dtype, "--export-dtype", args.export_dtype]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            print(f"{name:8s} {json.dumps(results[name])}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    make = results["make"]
    print(f"\nmodel: {args.shape}, {make['params'] / 1e6:.0f}M parameters, {make['hf_bytes'] / 1e6:.0f} MB of "
          f"{args.hf_dtype} safetensors; export as {args.export_dtype}")
    print("| phase | seconds | MB/s | peak RSS (GiB) |\n|---|---|---|---|")
    for name in ("load", "convert", "export"):
        r = results[name]
        print(f"| {name} | {r['seconds']:.1f} | {r['MB/s']:.0f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
