"""The `jaxlm` command. Each subcommand parses its own arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlm.config import ConfigError

CONFIG_HELP = """\
CONFIG words, in order:
  PRESET | FILE.py       a preset name from configs/ (e.g. tiny, llama3_1b) or a Python file defining config()
  FILE.toml | FILE.json  stacked override files (a run's saved config.json works), applied in order
  section.field=value    overrides, parsed as Python literals and type-checked, e.g.
                         model.num_layers=4 optim.lr=3e-4 mesh.fsdp=-1 optim.no_decay='("norm","bias")'
"""


def _train(args) -> int:
    from jaxlm import overrides, train

    config = overrides.load(args.config)
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    summary = train.train(config)
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}; run the same command to resume")
    print(f"run directory: {summary['run_dir']}")
    print(f"  checkpoints: {summary['checkpoints']} (step {summary['step']})")
    print(f"  metrics: {summary['run_dir']}/metrics.jsonl, TensorBoard: {summary['run_dir']}/tensorboard")
    print(f"  config: {summary['run_dir']}/config.json, loss curve: {summary['run_dir']}/loss.png")
    if "loss" in summary:
        line = f"  final train loss {summary['loss']:.4f}"
        if "eval_loss" in summary:
            line += f", eval loss {summary['eval_loss']:.4f}"
        print(line)
    return 0


def _generate(args) -> int:
    from jaxlm.generate import Generator, SamplingConfig
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
    run = load_run(args.run_dir, args.step)
    sp = run.tokenizer
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    prompts = [[sp.bos_id(), *sp.encode(t)] for t in texts]
    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    streaming = len(prompts) == 1
    shown = ""
    for tokens in Generator(run.model, run.params, sampling).stream(prompts):
        for i, token in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if token == sp.eos_id():
                done[i] = True
                continue
            outputs[i].append(token)
            text = sp.decode(outputs[i])
            if any(stop in text for stop in args.stop):
                done[i] = True
        if streaming:  # print the new text of the single prompt as it arrives
            text = _cut_at_stop(sp.decode(outputs[0]), args.stop)
            print(text[len(shown):], end="", flush=True)
            shown = text
        if all(done):
            break
    if streaming:
        print()
    else:
        for text, out in zip(texts, outputs):
            print(f"{text}{_cut_at_stop(sp.decode(out), args.stop)}\n")
    return 0


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def _presets(args) -> int:
    from jaxlm import overrides

    print("\n".join(overrides.list_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train, finetune and run LLMs with JAX.")
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
    p.add_argument("--step", type=int, help="checkpoint step to load (default: the latest)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

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
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for known failure kinds, tracebacks for bugs
        from jaxlm.train import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"jaxlm: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
