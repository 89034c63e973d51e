"""The `jaxlm` command. Each subcommand parses its own arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from jaxlm.config import ConfigError, LoraConfig, PrepareConfig, Range, SamplingConfig, TrainConfig, numeric_kind

CONFIG_HELP = """\
CONFIG words, in order:
  PRESET | FILE.py       a preset name from configs/ (e.g. tiny, llama3_1b) or a Python file defining config()
  FILE.toml | FILE.json  stacked override files (a run's saved config.json works), applied in order
  section.field=value    overrides, parsed as Python literals and type-checked, e.g.
                         model.num_layers=4 optim.lr=3e-4 mesh.fsdp=-1 optim.no_decay='("norm","bias")'
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, `jaxlm generate: error: ...` and exit status 2, like a ConfigError in
    `main`: the usage block argparse prints first is left to --help. Subcommands inherit the class."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class Bounded:
    """An argparse `type=`: a number of `kind` within `valid` (the config schema's Range), else a one-line
    error naming the flag, the value and the range."""

    def __init__(self, kind: type, valid: Range):
        self.kind, self.valid = kind, valid

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if self.kind is int else 'a number'}: must be {self.valid}") from None
        if value not in self.valid:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {self.valid}")
        return value


def bounded(kind: type, **bounds) -> Bounded:
    """A flag's own range, e.g. bounded(float, gt=0, le=1)."""
    return Bounded(kind, Range(**bounds))


def like(schema: type, name: str) -> Bounded:
    """A flag that sets what config field `schema.name` sets takes the same values: one range for both."""
    field = next(f for f in dataclasses.fields(schema) if f.name == name)
    return Bounded(numeric_kind(typing.get_type_hints(schema)[name]), field.metadata["range"])


STEP = bounded(int, ge=0)  # a checkpoint step
COUNT = bounded(int, ge=1)  # documents, rows, sentences


def _train(args) -> int:
    from jaxlm import overrides

    config = overrides.load(args.config)  # before importing the trainer (and JAX): a bad config costs nothing
    if config.model.init_from:  # show the model shape the starting checkpoint sets
        from jaxlm.training import base

        config = base.resolve(config)
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    if config.task != "pretrain":  # task=sft / task=dpo in a config: the finetuning entry point
        return _run_finetune(config)
    from jaxlm import train

    s = train.train(config)
    _print_run(s)
    print(f"  checkpoints: {s.checkpoints} (step {s.step})")
    print(f"  metrics: {s.run_dir}/metrics.jsonl, TensorBoard: {s.run_dir}/tensorboard")
    print(f"  config: {s.run_dir}/config.json, loss curve: {s.run_dir}/loss.png")
    if "loss" in s.metrics:
        line = f"  final train loss {s.metrics['loss']:.4f}"
        if "eval/loss" in s.metrics:
            line += f", eval loss {s.metrics['eval/loss']:.4f}"
        print(line)
    return 0


def _print_run(s) -> None:
    """The lines every training command starts its report with."""
    if s.stopped_by:
        print(f"stopped by {s.stopped_by} at step {s.step}; run the same command to resume")
    if s.changes:
        print("  changed since the last segment: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in s.changes.items()))
    print(f"run directory: {s.run_dir}")


def _generate(args) -> int:
    from jaxlm.generate import Generator, SamplingConfig, check_stops, complete_tokens, cut_at_stop
    from jaxlm.inference import load_run

    if args.prompt is not None:
        texts = [args.prompt]
    elif args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"cannot read --prompt-file: {e}") from None
    else:
        texts = [sys.stdin.read()]
    run = load_run(args.run_dir, args.step, quantize=args.quantize)
    tok = run.tokenizer
    check_stops(tok, args.stop)
    stops = list(args.stop)
    if args.chat:  # each prompt is one user turn, rendered with the run's chat template (ChatML if it has none)
        from jaxlm import chat

        template = chat.load(args.chat_template or "", model_dir=run.directory)
        rendered = [template.render([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
        stops += [template.stop_string] if template.stop_string else []
    else:
        rendered = texts
    prompts = []
    for text in rendered:
        ids = tok.encode(text)
        prompts.append(ids if ids[:1] == [tok.bos_id()] else [tok.bos_id(), *ids])  # a template may bring BOS
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    generator = Generator(run.model, run.params, sampling, run.mesh)
    if len(prompts) > 1:
        for text, completion in zip(texts, complete_tokens(generator, tok, prompts, tuple(stops), len(prompts))):
            print(f"{text}{completion}\n")
        return 0
    output, shown = [], ""
    for tokens in generator.stream(prompts):
        token = int(tokens[0])
        if token == tok.eos_id():
            break
        output.append(token)
        decoded = tok.decode(output)
        text = cut_at_stop(decoded, stops)
        print(text[len(shown):], end="", flush=True)  # stream the new text as it arrives
        shown = text
        if len(text) < len(decoded):  # a stop string was cut off
            break
    print()
    return 0


def _eval(args) -> int:
    import json

    from jaxlm.evaluation import runner
    from jaxlm.inference import load_run

    for task in args.task:  # before loading anything, so that a typo costs nothing
        runner.check_task(task)
    texts = None
    if args.text:
        from jaxlm.data import corpus

        texts = [doc for pattern in args.text for doc in corpus.text_files(pattern)]
        if not texts:
            raise ConfigError(f"--text {' '.join(args.text)} matched no non-empty text file")
    run = load_run(args.run_dir, args.step, quantize=args.quantize, block_size=args.block_size)
    results = runner.run_tasks(run.model, run.params, run.tokenizer, run.config, args.task or ["perplexity"],
                               texts=texts, limit=args.limit, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, mesh=run.mesh)
    summary = {"run_dir": args.run_dir, "step": run.step, "quantize": args.quantize, "results": results}
    print(json.dumps(summary, indent=2))
    if args.output:
        from jaxlm.core import atomic

        atomic.write_json(args.output, summary)
    return 0


def _quantize(args) -> int:
    from jaxlm.evaluation import quantization, runner
    from jaxlm.inference import load_run

    run = load_run(args.run_dir, args.step)
    texts = runner.heldout_texts(run.config)[: args.limit]
    rows = quantization.report(run.model, run.params, run.tokenizer, texts, tuple(args.format or ("int8", "int4")), args.block_size)
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


def _convert_from_hf(args) -> int:
    from jaxlm import overrides
    from jaxlm.hf import importer

    config = importer.convert(args.hf_dir, args.out, overrides.load(args.config) if args.config else None)
    m = config.model
    print(f"imported {args.hf_dir}: {m.num_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}")
    print(f"run directory: {config.train.run_dir}  (jaxlm generate {args.out}; jaxlm convert to-hf {args.out} DIR)")
    return 0


def _convert_to_hf(args) -> int:
    from jaxlm.hf import exporter

    out = exporter.export(args.run_dir, args.out, args.dtype, args.step, int(args.max_shard_gb * (1 << 30)))
    print(f"Hugging Face checkpoint: {out}  (transformers.AutoModelForCausalLM.from_pretrained({out!r}))")
    return 0


def _finetune(args) -> int:
    from jaxlm import overrides

    config = overrides.load(args.config)
    if config.task == "pretrain":  # the finetune command defaults to SFT
        import dataclasses

        config = dataclasses.replace(config, task="sft")
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    return _run_finetune(config)


def _run_finetune(config) -> int:
    from jaxlm import finetune

    s = finetune.finetune(config)
    _print_run(s)
    print(f"  data: {s.data}")
    m = s.metrics
    if "loss" in m:
        line = f"  final train loss {m['loss']:.4f}"
        if "margin" in m:
            line += f", margin {m['margin']:.4f}, reward accuracy {m['reward_accuracy']:.2f}"
        if "eval/loss" in m:
            before = f"{s.eval_before['loss']:.4f} -> " if "loss" in s.eval_before else ""
            line += f"; eval loss {before}{m['eval/loss']:.4f}"
        print(line)
    print(f"  base params: {s.base_mib:.1f} MiB")
    if s.adapters:
        print(f"  LoRA adapters: {s.adapters}  (jaxlm peft export RUN OUT writes them for peft)")
    if s.merged:
        print(f"  merged model: {s.merged}  (jaxlm generate {s.run_dir}; jaxlm convert to-hf {s.run_dir} DIR)")
    return 0


def _prepare_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="jaxlm data prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Normalise, filter, scrub PII, deduplicate (exact and MinHash), decontaminate and tokenize "
                    "raw .txt/.jsonl/.parquet files into ArrayRecord shards plus manifest.json. A re-run resumes.\n"
                    "Settings are field=value words (see PrepareConfig in jaxlm/config.py), e.g.\n"
                    "  jaxlm data prepare 'raw/*.jsonl' --out data/web text_field=content vocab_size=16000 \\\n"
                    "      languages='(\"en\",\"zh\")' minhash_threshold=0.7 decontaminate='(\"evals/*.jsonl\",)'",
    )
    p.add_argument("words", nargs="+", metavar="INPUT|field=value", help="input files or globs, and settings")
    p.add_argument("--out", required=True, help="output folder (created; a re-run with the same inputs resumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _data_prepare(args) -> int:
    from jaxlm.data import prepare

    if args.show_help or not args.argv:
        _prepare_parser().print_help()
        return 0
    args = _prepare_parser().parse_intermixed_args(args.argv)
    inputs = [w for w in args.words if "=" not in w]
    if not inputs:
        raise ConfigError("give input files or globs, e.g. jaxlm data prepare 'raw/*.jsonl' --out data/mine")
    manifest = prepare.prepare(inputs, args.out, prepare.parse_config([w for w in args.words if "=" in w]),
                               progress=not args.no_progress)
    files = manifest["files"]
    for f in files:
        problems = {k: f[k] for k in ("malformed_json", "invalid_utf8", "missing_field", "huge") if f[k]}
        if f["empty_file"] or f["error"] or problems:
            print(f"  {f['path']}: {f['docs']} documents; skipped: "
                  + ", ".join([f"{k} {v}" for k, v in problems.items()] + ["empty file"] * f["empty_file"]
                              + ([f["error"]] if f["error"] else [])))
    for name, st in manifest["stages"].items():
        if st.get("dropped"):
            print(f"  {name}: dropped " + ", ".join(f"{k} {v}" for k, v in st["dropped"].items()))
    if manifest["pii"]:
        print("  pii replaced: " + ", ".join(f"{k} {v}" for k, v in manifest["pii"].items()))
    print(f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards: "
          f"{args.out}/manifest.json\ntrain on it with: jaxlm train tiny data.prepared='{args.out}'")
    return 0


def _data_from_seqio(args) -> int:
    from jaxlm.data import seqio_source

    result = seqio_source.export(args.task, args.out, ",".join(args.module), args.split, args.feature, args.seed,
                                 args.docs_per_shard, progress=not args.no_progress)
    folders = ",".join(f"'{f}'" for f in result.folders)
    line = f"jaxlm train tiny data.prepared=\"({folders},)\""
    if result.is_mixture:
        line += f" data.weights='({','.join(f'{w:.6g}' for w in result.weights)},)'"
    print(f"{result.documents:,} documents, {result.tokens:,} tokens in {len(result.folders)} folder(s) under "
          f"{args.out}\ntrain on it with: {line}")
    return 0


def _tokenizer_train(args) -> int:
    import time

    from jaxlm.config import PrepareConfig
    from jaxlm.data import normalize, readers, tokenizer

    c = PrepareConfig(text_field=args.text_field)
    paths = readers.expand(args.inputs)
    lines = (line for p in paths for doc in readers.read(p, c, readers.FileStats(p))
             for line in normalize.normalize(doc).split("\n") if line.strip())
    start = time.perf_counter()
    try:
        tokenizer.train(lines, args.vocab_size, args.type, args.out, max_sentences=args.max_sentences)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train a {args.vocab_size}-piece tokenizer: {e}") from None
    print(f"wrote {args.out} ({args.type}, {args.vocab_size} pieces, {time.perf_counter() - start:.1f}s, "
          f"sha256 {tokenizer.file_hash(args.out)})")
    return 0


def _peft_export(args) -> int:
    from jaxlm import adapter_runs

    out = adapter_runs.export_run(args.run_dir, args.out, args.base_model)
    print(f"PEFT adapter: {out}  (peft.PeftModel.from_pretrained(base_model, {out!r}))")
    return 0


def _peft_import(args) -> int:
    from jaxlm import adapter_runs

    out = adapter_runs.import_run(args.adapter_dir, args.base_run, args.out)
    print(f"run directory: {out}  (the base with the adapter merged; the adapter itself in {out}/adapters)")
    return 0


def _plan(args) -> int:
    import os

    # Planning compiles for the target, never for a local accelerator; these also quiet libtpu on a host
    # without TPUs.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is ever opened
    from jaxlm import overrides, plan

    config = overrides.load(args.config)
    target = plan.parse_target(args.target, args.slices)
    result = plan.make_plan(config, target, mfu=args.mfu, method=args.method)
    print(plan.format_plan(config, result))
    return 0 if result.fits else 1


def _presets(args) -> int:
    from jaxlm import overrides

    print("\n".join(overrides.list_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxlm", description="Train, finetune and run LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="pretrain a model", description="Pretrain a model. " + CONFIG_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["tiny"], help="preset, config files and overrides (default: tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="generate text from a trained run",
                       description="Generate text from the latest checkpoint of a run directory. The prompt "
                                   "comes from --prompt, --prompt-file (one prompt per line, batched) or stdin.")
    p.add_argument("run_dir", help="a run directory written by `jaxlm train` (holds config.json, tokenizer.model)")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="a file with one prompt per line, generated as one batch")
    p.add_argument("--step", type=STEP, help="checkpoint step to load (default: the latest)")
    p.add_argument("--max-new-tokens", type=like(SamplingConfig, "max_new_tokens"), default=64)
    p.add_argument("--temperature", type=like(SamplingConfig, "temperature"), default=0.0,
                   help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=like(SamplingConfig, "top_k"), default=0, help="0 (default) disables")
    p.add_argument("--top-p", type=like(SamplingConfig, "top_p"), default=1.0, help="in (0, 1]; 1 (default) disables")
    p.add_argument("--repetition-penalty", type=like(SamplingConfig, "repetition_penalty"), default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=like(SamplingConfig, "seed"), default=0)
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"), help="weight-only quantize the params first")
    p.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and render it with the run's chat template")
    p.add_argument("--chat-template", help="a .jinja chat template to use instead of the run's own")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="evaluate a trained run",
                       description="Evaluate the latest checkpoint of a run directory. Tasks: perplexity "
                                   "(and bits-per-byte) on the run's held-out text or --text files; mc:FILE.jsonl, "
                                   "log-likelihood multiple choice with lines {\"context\", \"choices\", \"answer\"}; "
                                   "humaneval, pass@1 with the generated code run in a sandboxed subprocess. "
                                   "For lm-evaluation-harness tasks: `python -m jaxlm.evaluation.harness run --model jaxlm "
                                   "--model_args run_dir=RUN --tasks TASKS` (pip install \"jaxlm[eval]\").")
    p.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    p.add_argument("--task", action="append", default=[], help="perplexity (default), mc:FILE.jsonl or humaneval; repeatable")
    p.add_argument("--text", action="append", default=[], help="glob of .txt files for perplexity instead of the held-out split")
    p.add_argument("--limit", type=COUNT, help="evaluate only the first N documents/questions/problems")
    p.add_argument("--step", type=STEP, help="checkpoint step (default: the latest)")
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"), help="weight-only quantize the params first")
    p.add_argument("--block-size", type=like(LoraConfig, "block_size"), default=128,
                   help="quantization block (group) size")
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--max-new-tokens", type=like(SamplingConfig, "max_new_tokens"), default=256,
                   help="generation budget for humaneval")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("quantize", help="measure weight-only quantization of a run",
                       description="Quantizes a run's params (weight-only, one scale per block) and reports the "
                                   "memory saved, the perplexity and bits-per-byte change on held-out text, and the "
                                   "logits difference against the float params. Use the format with `jaxlm generate "
                                   "--quantize` or `jaxlm eval --quantize`.")
    p.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    p.add_argument("--format", action="append", choices=("int8", "int4", "nf4"),
                   help="format(s) to measure, repeatable (default: int8 and int4)")
    p.add_argument("--block-size", type=like(LoraConfig, "block_size"), default=128)
    p.add_argument("--limit", type=COUNT, default=20, help="held-out documents for perplexity (default 20)")
    p.add_argument("--step", type=STEP, help="checkpoint step (default: the latest)")
    p.set_defaults(func=_quantize, format=None)

    p = sub.add_parser("convert", help="import or export Hugging Face checkpoints",
                       description="Convert between Hugging Face checkpoints (config.json + safetensors) and "
                                   "jaxlm run directories.")
    convert = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    q = convert.add_parser(
        "from-hf", help="Hugging Face checkpoint -> jaxlm run directory", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import a LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3 or GPT-2 checkpoint (config.json + *.safetensors, "
                    "sharded or not, with its tokenizer and chat template) as a jaxlm run directory that "
                    "`jaxlm generate OUT` and `jaxlm train OUT/config.json` use. To start a new training run from "
                    "a checkpoint instead, pass model.init_from=hf:DIR to `jaxlm train`. " + CONFIG_HELP)
    q.add_argument("hf_dir", help="the Hugging Face model directory")
    q.add_argument("out", help="the run directory to create (must not exist or be empty)")
    q.add_argument("config", nargs="*", help="optional preset/overrides for the run's non-model settings, "
                                             "e.g. model.dtype=float32 mesh.tensor=2")
    q.set_defaults(func=_convert_from_hf)
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
    q.set_defaults(func=_convert_to_hf)

    p = sub.add_parser(
        "finetune", help="SFT or DPO, full or LoRA/QLoRA",
        description="Finetune a model: task=sft (default) on chat JSONL ({\"messages\": [...]} or\n"
                    "{\"prompt\", \"response\"}), loss on assistant tokens only; or task=dpo on\n"
                    "{\"prompt\", \"chosen\", \"rejected\"} JSONL. model.init_from: a jaxlm run directory, hf:DIR,\n"
                    "or empty for random weights. finetune.data: a JSONL file, chatterbot:english or\n"
                    "chatterbot:chinese. lora.targets (path regexes such as 'attn/(q|v)$') switch to LoRA,\n"
                    "lora.quantize=int8|nf4 to QLoRA.\n\nExample: jaxlm finetune sft_tiny model.init_from=runs/tiny\n\n"
                    + CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["sft_tiny"], help="preset, config files and overrides (default: sft_tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_finetune)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", metavar="COMMAND",
                                                                                required=True)
    # The settings (field=value words) may come before or after --out, which argparse's positional
    # handling cannot mix; the prepare words are parsed by their own parser (_prepare_parser), whose
    # help is shown here.
    p = data.add_parser("prepare", help="raw text to clean, deduplicated, tokenized shards", add_help=False,
                        usage=argparse.SUPPRESS, description=_prepare_parser().format_help(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", dest="show_help", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_data_prepare)
    p = data.add_parser(
        "from-seqio", help="a registered seqio Task or Mixture -> prepared shards (pip install 'jaxlm[seqio]')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a seqio Task's already-tokenized feature, in order, and write it as a prepared folder\n"
                    "(ArrayRecord shards + manifest.json + the vocabulary's sentencepiece model) that\n"
                    "`jaxlm train data.prepared=OUT` reads with global shuffling, packing and exact resume.\n"
                    "A Mixture becomes one folder per task plus OUT/mixture.json, with data.weights =\n"
                    "rate x mean tokens per example (seqio rates count examples, jaxlm weights count tokens).\n"
                    "A re-run with an unchanged task is a no-op. To export on first use instead, train with\n"
                    "data.seqio_task=NAME data.seqio_module=MODULE. Example:\n"
                    "  jaxlm data from-seqio my_corpus data/my_corpus --module my_tasks")
    p.add_argument("task", help="the registered seqio Task or Mixture name")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--module", action="append", default=[],
                   help="module that registers the task, imported first (repeatable; must be importable)")
    p.add_argument("--split", default="train", help="the split to export (default: train)")
    p.add_argument("--feature", default="targets", help="the tokenized feature to train on (default: targets)")
    p.add_argument("--seed", type=like(TrainConfig, "seed"), default=0,
                   help="seed for seqio's stochastic preprocessors (default 0)")
    p.add_argument("--docs-per-shard", type=like(PrepareConfig, "docs_per_shard"), default=10_000)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_data_from_seqio)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                             metavar="COMMAND", required=True)
    p = tok.add_parser("train", help="train a sentencepiece tokenizer on text files",
                       description="Train a sentencepiece model (byte fallback, CJK-friendly character coverage, "
                                   "digits split) on .txt/.jsonl/.parquet files, one sentence per line.")
    p.add_argument("inputs", nargs="+", help="input files or globs")
    p.add_argument("--out", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=like(PrepareConfig, "vocab_size"), default=8192)
    p.add_argument("--type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--text-field", default="text", help="JSONL key or Parquet column holding the text")
    p.add_argument("--max-sentences", type=COUNT, default=2_000_000,
                   help="train on a random sample of this many lines")
    p.set_defaults(func=_tokenizer_train)

    p = sub.add_parser("peft", help="export or import PEFT LoRA adapters",
                       description="Move LoRA adapters between jaxlm and the Hugging Face peft library "
                                   "(adapter_config.json + adapter_model.safetensors; LLaMA-family models).")
    peft_sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    q = peft_sub.add_parser("export", help="a LoRA finetuning run's adapters -> PEFT adapter directory",
                            description="Write <run>/adapters as a PEFT adapter that peft loads onto the base "
                                        "model exported with `jaxlm convert to-hf` (or the original HF model).")
    q.add_argument("run_dir", help="a run directory written by `jaxlm finetune` with lora.targets set")
    q.add_argument("out", help="the adapter directory to create (must not exist or be empty)")
    q.add_argument("--base-model", default="", help="base_model_name_or_path to record in adapter_config.json")
    q.set_defaults(func=_peft_export)
    q = peft_sub.add_parser("import", help="PEFT adapter + jaxlm base run -> run directory with it merged",
                            description="Read a PEFT LoRA adapter (rsLoRA too; not DoRA) for a base run directory "
                                        "(e.g. from `jaxlm convert from-hf`) and write a new run directory with "
                                        "the adapter merged in and saved in jaxlm's format under adapters/.")
    q.add_argument("adapter_dir", help="the PEFT adapter directory")
    q.add_argument("base_run", help="the jaxlm run directory of the base model")
    q.add_argument("out", help="the run directory to create (must not exist or be empty)")
    q.set_defaults(func=_peft_import)

    p = sub.add_parser("plan", help="will CONFIG fit on a TPU/GPU target, and how fast (before renting it)",
                       description="Memory per device (parameters, optimizer, activations, temporaries), fit, "
                                   "FLOPs and step time at a stated MFU, mesh placement, and a suggested change "
                                   "when it does not fit. TPU targets are also compiled ahead of time with XLA "
                                   "when libtpu is installed (pip install \"jaxlm[tpu-plan]\"). Exit status 0 "
                                   "if it fits, 1 if not. " + CONFIG_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="+", help="preset, config files and overrides, as for `jaxlm train`")
    p.add_argument("--target", required=True, help="e.g. v5p-256, v5e:8x8, v6e-256, h100x8")
    p.add_argument("--slices", type=COUNT, default=1, help="TPU slices joined over DCN (multislice; default 1)")
    p.add_argument("--mfu", type=bounded(float, gt=0, le=1), default=0.4,
                   help="model FLOPs utilisation for the step time, in (0, 1] (default 0.4)")
    p.add_argument("--method", choices=("auto", "analytic", "compile"), default="auto",
                   help="auto: compile when the target's compiler is installed, else analytic")
    p.set_defaults(func=_plan)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        from jaxlm.checkpoint import DamagedCheckpoint

        hint = ""
        if isinstance(e, DamagedCheckpoint) and e.intact and hasattr(args, "step"):  # the command takes --step
            hint = f"; pass --step {e.intact[-1]}"
        print(f"jaxlm: error: {e}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for known failure kinds, tracebacks for bugs
        from jaxlm.training.loop import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"jaxlm: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
