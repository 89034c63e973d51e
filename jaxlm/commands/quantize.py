"""`jaxlm quantize`: what weight-only quantization saves and costs on a run's checkpoint."""

from __future__ import annotations

from jaxlm.commands.args import COUNT, QUANT_FORMATS, STEP, like
from jaxlm.core.config import LoraConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="measure weight-only quantization of a run",
                              description="Quantizes a run's params (weight-only, one scale per block) and reports the "
                                          "memory saved, the perplexity and bits-per-byte change on held-out text, and "
                                          "the logits difference against the float params. Use the format with `jaxlm "
                                          "generate --quantize` or `jaxlm eval --quantize`.")
    p.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    p.add_argument("--format", action="append", choices=QUANT_FORMATS,
                   help="format(s) to measure, repeatable (default: int8 and int4)")
    p.add_argument("--block-size", type=like(LoraConfig, "block_size"), default=128)
    p.add_argument("--limit", type=COUNT, default=20, help="held-out documents for perplexity (default 20)")
    p.add_argument("--step", type=STEP, help="checkpoint step (default: the latest)")
    p.set_defaults(func=run, format=None)


def run(args) -> int:
    from jaxlm.evaluation import quantization, runner
    from jaxlm.inference.load import load_run

    loaded = load_run(args.run_dir, args.step, language_model=False)
    texts = runner.heldout_texts(loaded.config)[: args.limit]
    rows = quantization.report(loaded.model, loaded.params, loaded.tokenizer, texts,
                               tuple(args.format or ("int8", "int4")), args.block_size)
    print(f"{'format':8} {'MiB':>8} {'saved':>6} {'ppl':>9} {'Δppl':>7} {'bits/byte':>9} {'max|Δlogit|':>11} "
          f"{'mean|Δlogit|':>12} {'top1 agree':>10}")
    for fmt, r in rows.items():
        extra = ("" if fmt == "float" else f" {r['memory_saved']:6.1%}") or ""
        print(f"{fmt:8} {r['param_bytes'] / 2**20:8.2f}{extra or ' ' * 7} {r['perplexity']:9.3f} "
              f"{'' if fmt == 'float' else format(r['perplexity_change'], '+7.2%'):>7} {r['bits_per_byte']:9.4f} "
              + ("" if fmt == "float" else f"{r['logits_max_abs_diff']:11.4f} {r['logits_mean_abs_diff']:12.5f} "
                                           f"{r['top1_agreement']:10.2%}"))
    print(f"(held-out documents: {len(texts)}; logits compared on up to 4 rows of held-out tokens)")
    return 0
