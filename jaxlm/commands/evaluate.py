"""`jaxlm eval`: perplexity, multiple choice and HumanEval on a run's checkpoint."""

from __future__ import annotations

from jaxlm.commands.args import COUNT, QUANT_FORMATS, STEP, like
from jaxlm.core.config import ConfigError, LoraConfig, SamplingConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a trained run",
        description="Evaluate the latest checkpoint of a run directory. Tasks: perplexity "
                    "(and bits-per-byte) on the run's held-out text or --text files; mc:FILE.jsonl, "
                    "log-likelihood multiple choice with lines {\"context\", \"choices\", \"answer\"}; "
                    "humaneval, pass@1 with the generated code run in a sandboxed subprocess. "
                    "For lm-evaluation-harness tasks: `python -m jaxlm.evaluation.harness run --model jaxlm "
                    "--model_args run_dir=RUN --tasks TASKS` (pip install \"jaxlm[eval]\").")
    p.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    p.add_argument("--task", action="append", default=[], help="perplexity (default), mc:FILE.jsonl, targets:FILE.jsonl (perplexity of each "
                   "{\"input\", \"target\"} row's target; an encoder-decoder's task) or humaneval; repeatable")
    p.add_argument("--text", action="append", default=[], help="glob of .txt files for perplexity instead of the held-out split")
    p.add_argument("--limit", type=COUNT, help="evaluate only the first N documents/questions/problems")
    p.add_argument("--step", type=STEP, help="checkpoint step (default: the latest)")
    p.add_argument("--quantize", choices=QUANT_FORMATS, help="weight-only quantize the params first")
    p.add_argument("--block-size", type=like(LoraConfig, "block_size"), default=128,
                   help="quantization block (group) size")
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--max-new-tokens", type=like(SamplingConfig, "max_new_tokens"), default=256,
                   help="generation budget for humaneval")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from jaxlm.evaluation import runner
    from jaxlm.inference.load import load_run

    for task in args.task:  # before loading anything, so that a typo costs nothing
        runner.check_task(task)
    texts = None
    if args.text:
        from jaxlm.data import corpus

        texts = [doc for pattern in args.text for doc in corpus.text_files(pattern)]
        if not texts:
            raise ConfigError(f"--text {' '.join(args.text)} matched no non-empty text file")
    loaded = load_run(args.run_dir, args.step, quantize=args.quantize, block_size=args.block_size)
    if not args.task and loaded.config.model.encoder_decoder:
        raise ConfigError("an encoder-decoder has no held-out text perplexity; pass --task targets:FILE.jsonl")
    results = runner.run_tasks(loaded.model, loaded.params, loaded.tokenizer, loaded.config,
                               args.task or ["perplexity"], texts=texts, limit=args.limit, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, mesh=loaded.mesh)
    summary = {"run_dir": args.run_dir, "step": loaded.step, "quantize": args.quantize, "results": results}
    print(json.dumps(summary, indent=2))
    if args.output:
        from jaxlm.core import atomic

        atomic.write_json(args.output, summary)
    return 0
