"""`jaxlm convert from-hf` and `jaxlm convert to-hf`: Hugging Face checkpoints in and out."""

from __future__ import annotations

import argparse

from jaxlm.commands.args import CONFIG_HELP, STEP, bounded


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="import or export Hugging Face checkpoints",
                              description="Convert between Hugging Face checkpoints (config.json + safetensors) and "
                                          "jaxlm run directories.")
    convert = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    q = convert.add_parser(
        "from-hf", help="Hugging Face checkpoint -> jaxlm run directory", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import a LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE or GPT-2 checkpoint (config.json + *.safetensors, "
                    "sharded or not, with its tokenizer and chat template) as a jaxlm run directory that "
                    "`jaxlm generate OUT` and `jaxlm train OUT/config.json` use. To start a new training run from "
                    "a checkpoint instead, pass model.init_from=hf:DIR to `jaxlm train`. " + CONFIG_HELP)
    q.add_argument("hf_dir", help="the Hugging Face model directory")
    q.add_argument("out", help="the run directory to create (must not exist or be empty)")
    q.add_argument("config", nargs="*", help="optional preset/overrides for the run's non-model settings, "
                                             "e.g. model.dtype=float32 mesh.tensor=2")
    q.set_defaults(func=from_hf)
    q = convert.add_parser(
        "to-hf", help="jaxlm run directory -> Hugging Face checkpoint",
        description="Export a run's checkpoint as config.json + model.safetensors (sharded with an index above "
                    "--max-shard-gb) + tokenizer files, which transformers loads as-is.")
    q.add_argument("run_dir", help="a run directory (from `jaxlm train` or `jaxlm convert from-hf`)")
    q.add_argument("out", help="the directory to create (must not exist or be empty)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="tensor dtype (default float32)")
    q.add_argument("--step", type=STEP, help="checkpoint step to export (default: the latest)")
    q.add_argument("--max-shard-gb", type=bounded(float, gt=0), default=5.0,
                   help="largest safetensors file, in GiB (default 5)")
    q.set_defaults(func=to_hf)


def from_hf(args) -> int:
    from jaxlm.core import overrides
    from jaxlm.conversion import hf_runs

    config = hf_runs.from_hf(args.hf_dir, args.out, overrides.load(args.config) if args.config else None)
    m = config.model
    print(f"imported {args.hf_dir}: {m.num_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}")
    use = "" if m.num_labels else f"jaxlm generate {args.out}; "  # a reward model scores, it does not generate
    print(f"run directory: {config.train.run_dir}  ({use}jaxlm convert to-hf {args.out} DIR)")
    return 0


def to_hf(args) -> int:
    from jaxlm.conversion import hf_runs

    import json
    import os

    out = hf_runs.to_hf(args.run_dir, args.out, args.dtype, args.step, int(args.max_shard_gb * (1 << 30)))
    with open(os.path.join(out, "config.json")) as f:
        archs = json.load(f).get("architectures") or []
    # The Auto class of the exported head: a classifier, an encoder-decoder, a masked LM or a causal LM.
    kinds = {"ForSequenceClassification": "AutoModelForSequenceClassification",
             "ForConditionalGeneration": "AutoModelForSeq2SeqLM", "ForMaskedLM": "AutoModelForMaskedLM"}
    auto = next((cls for suffix, cls in kinds.items() if any(a.endswith(suffix) for a in archs)), "AutoModelForCausalLM")
    print(f"Hugging Face checkpoint: {out}  (transformers.{auto}.from_pretrained({out!r}))")
    return 0
