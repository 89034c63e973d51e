"""`jaxlm generate`: text from a run's checkpoint, streamed for one prompt, batched for a prompt file."""

from __future__ import annotations

import sys

from jaxlm.commands.args import QUANT_FORMATS, STEP, like
from jaxlm.core.config import ConfigError, SamplingConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a trained run",
                              description="Generate text from the latest checkpoint of a run directory. The prompt "
                                          "comes from --prompt, --prompt-file (one prompt per line, batched) or stdin. "
                                          "A decoder-only model continues the prompt; an encoder-decoder (T5) reads it "
                                          "as its input and writes its output from the decoder's start token.")
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
    p.add_argument("--quantize", choices=QUANT_FORMATS, help="weight-only quantize the params first")
    p.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and render it with the run's chat template "
                        "(decoder-only models)")
    p.add_argument("--chat-template", help="with --chat: a .jinja chat template to use instead of the run's own")
    p.set_defaults(func=run)


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"cannot read --prompt-file: {e}") from None
    return [sys.stdin.read()]


def run(args) -> int:
    from jaxlm.inference.generate import Generator, check_stops, complete_tokens
    from jaxlm.inference.load import GENERATES, load_run

    texts = _read_prompts(args)
    if args.chat:  # before the checkpoint is read: only a decoder-only run has a chat template to render
        _decoder_only(args.run_dir)
    loaded = load_run(args.run_dir, args.step, quantize=args.quantize, architectures=GENERATES,
                      purpose="jaxlm generate")
    tok = loaded.tokenizer
    check_stops(tok, args.stop)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    if loaded.config.model.encoder_decoder:
        from jaxlm.inference.seq2seq_generate import Seq2SeqGenerator

        prompts, stops = _encoder_inputs(args, loaded, texts), list(args.stop)
        generator = Seq2SeqGenerator(loaded.model, loaded.params, sampling, loaded.mesh)
    else:
        prompts, stops = _decoder_prompts(args, loaded, texts)
        generator = Generator(loaded.model, loaded.params, sampling, loaded.mesh)
    if len(prompts) > 1:
        # A decoder continues its prompt; an encoder-decoder's output is an answer of its own.
        joint = " => " if loaded.config.model.encoder_decoder else ""
        for text, completion in zip(texts, complete_tokens(generator, tok, prompts, tuple(stops), len(prompts))):
            print(f"{text}{joint}{completion}\n")
        return 0
    _stream(generator, tok, prompts, stops)
    return 0


def _decoder_prompts(args, loaded, texts) -> tuple[list[list[int]], list[str]]:
    """A decoder-only model's prompts (after BOS) and stop strings: with --chat, each text is one user turn,
    rendered with the run's chat template (ChatML if it has none), whose end of turn stops generation."""
    from jaxlm.inference.generate import prompt_ids

    stops = list(args.stop)
    if args.chat:
        from jaxlm.data import chat

        template = chat.load(args.chat_template or "", model_dir=loaded.directory)
        texts = [template.render([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
        stops += [template.stop_string] if template.stop_string else []
    return [prompt_ids(loaded.tokenizer, text) for text in texts], stops


def _decoder_only(run_dir: str) -> None:
    """A one-line error for --chat with an encoder-decoder run, from its config alone."""
    import os

    from jaxlm.core import overrides, rundir

    path = os.path.join(os.path.expanduser(run_dir), rundir.CONFIG)
    arch = overrides.load([path]).model.architecture if os.path.isfile(path) else "llama"
    if arch == "t5":
        raise ConfigError(f"--chat renders a chat template for a decoder-only model, but {run_dir} is an "
                          f"encoder-decoder (model.architecture={arch}); pass the input text itself with --prompt "
                          f"or --prompt-file")


def _encoder_inputs(args, loaded, texts) -> list[list[int]]:
    """An encoder-decoder's inputs: each text's tokens and EOS, as T5 reads its inputs (no BOS); the decoder
    starts from the model's start token."""
    eos = loaded.tokenizer.eos_id()
    if eos < 0:
        raise ConfigError(f"{loaded.tokenizer.path} has no EOS token, which ends an encoder-decoder's inputs and "
                          f"its output; use the model's own tokenizer")
    return [[*loaded.tokenizer.encode(text), eos] for text in texts]


def _stream(generator, tok, prompts, stops) -> None:
    """Prints one prompt's completion as it arrives, up to EOS or a stop string."""
    from jaxlm.serving.detokenize import TextStream

    # TextStream holds back what could still become a stop string, so a stop is never half printed.
    text = TextStream(tok, list(stops))
    for tokens in generator.stream(prompts):
        token = int(tokens[0])
        if token == tok.eos_id():
            break
        print(text.push(token), end="", flush=True)  # stream the new text as it arrives
        if text.stopped:
            break
    print(text.finish())
