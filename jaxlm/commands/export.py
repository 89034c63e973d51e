"""`jaxlm export onnx`: a run's decoder as ONNX graphs for onnxruntime."""

from __future__ import annotations

import argparse

from jaxlm.commands.args import STEP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run for other runtimes (ONNX)",
                              description="Export a run's checkpoint in a format other runtimes load. For Hugging "
                                          "Face checkpoints see `jaxlm convert to-hf`.")
    export = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = export.add_parser(
        "onnx", help="run directory -> ONNX graphs for onnxruntime",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write a run's decoder as float32 ONNX graphs (converted by jax2onnx; needs pip install 'jaxlm[onnx]'):

  model.onnx              input_ids (batch, seq) -> logits (batch, seq, vocab): the full forward pass
  decoder_with_past.onnx  input_ids, position_ids (batch, seq), past_key, past_value (layers, batch, cache,
                          kv_heads, head_dim), slot (the cache slot of input_ids[:, 0]), valid (batch, cache)
                          -> logits, present_key, present_value: a prompt or one new token, with a KV cache

Batch, sequence and cache lengths are free. OUT also gets each graph's weights (*.onnx.data), the run's
tokenizer files and onnx_config.json (the inputs and outputs, the cache's dims, bos/eos ids).
jaxlm.conversion.onnx_export.greedy(OUT, prompt_tokens, max_new_tokens) is the greedy loop in onnxruntime
(numpy and onnxruntime only: its body is the loop to copy). Mixture-of-experts models cannot be exported.""")
    q.add_argument("run_dir", help="a run directory (from `jaxlm train` or `jaxlm convert from-hf`)")
    q.add_argument("out", help="the directory to create (must not exist or be empty)")
    q.add_argument("--step", type=STEP, help="checkpoint step to export (default: the latest)")
    q.set_defaults(func=onnx)


def onnx(args) -> int:
    from jaxlm.conversion import onnx_export

    print(f"exporting {args.run_dir} to ONNX: {onnx_export.FULL} and {onnx_export.STEP}")
    out = onnx_export.export(args.run_dir, args.out, args.step)
    print(f"ONNX directory: {out}  (onnxruntime.InferenceSession('{out}/{onnx_export.FULL}'))")
    return 0
