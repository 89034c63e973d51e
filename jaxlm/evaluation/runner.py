"""Runs named evaluation tasks on a model and its params; shared by `jaxlm eval` and the training hook.

Task names:
  perplexity            perplexity and bits-per-byte on held-out text (the run's own held-out split by default)
  mc:FILE.jsonl         log-likelihood multiple choice (see jaxlm.evaluation.multiple_choice)
  humaneval             HumanEval pass@1, greedy, code run in the sandbox
  targets:FILE.jsonl    perplexity of each {"input", "target"} row's target given its input (jaxlm.evaluation.seq2seq);
                        the one task of an encoder-decoder
"""

from __future__ import annotations

import time

from jaxlm.core.config import Config, ConfigError
from jaxlm.data import corpus
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.evaluation import humaneval, multiple_choice, perplexity, seq2seq
from jaxlm.inference.generate import Generator, SamplingConfig, complete
from jaxlm.inference.scoring import Scorer


def heldout_texts(config: Config) -> list[str]:
    """The documents the run held out from training (the same split the trainer's eval loss uses)."""
    if config.data.prepared or config.data.seqio_task:
        raise ConfigError("this run trained on prepared shards, which hold tokens rather than text; give the "
                          "held-out text for perplexity with --text GLOB")
    docs = corpus.documents(config.data.source)
    return corpus.split(docs, config.data.eval_fraction)[1]


def check_task(name: str, model_config=None) -> None:
    """A one-line error for an unknown task, or one the model cannot run (`model_config`, when known)."""
    known = name in ("perplexity", "humaneval") or any(name.startswith(p) and len(name) > len(p) for p in ("mc:", "targets:"))
    if not known:
        raise ConfigError(f"unknown eval task {name!r}; use perplexity, mc:FILE.jsonl, targets:FILE.jsonl or humaneval")
    arch = getattr(model_config, "architecture", "llama")
    if arch == "bert":
        raise ConfigError("an encoder (model.architecture=bert) has no eval task: its held-out masked-LM loss is "
                          "in the run's metrics (train.eval_batches)")
    if arch == "t5" and not name.startswith("targets:"):
        raise ConfigError(f"eval task {name} scores a causal language model; an encoder-decoder (model.architecture"
                          "=t5) evaluates with targets:FILE.jsonl ({\"input\", \"target\"} rows)")


def run_tasks(model, params, tokenizer: Tokenizer, config: Config, tasks: list[str], texts: list[str] | None = None,
              limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256,
              progress: bool = True, mesh=None, scorer: Scorer | None = None) -> dict[str, dict]:
    """`scorer`: one kept across calls (the training hook) reuses its compiled programs; it gets `params`."""
    for name in tasks:
        check_task(name, model.config)
    scorer = scorer or (None if model.config.encoder_decoder or model.config.encoder_only else
                        Scorer(model, params, batch_size))
    if scorer is not None:
        scorer.params = params
    results = {}
    for name in tasks:
        start = time.perf_counter()
        if name == "perplexity":
            docs = texts if texts is not None else heldout_texts(config)
            results[name] = perplexity.perplexity(scorer, tokenizer, docs[:limit], progress)
        elif name.startswith("targets:"):
            rows = seq2seq.load_rows(name.split(":", 1)[1])[:limit]
            results[name] = seq2seq.target_perplexity(model, params, tokenizer, rows, batch_size, progress, scorer)
        elif name.startswith("mc:"):
            results[name] = multiple_choice.evaluate(scorer, tokenizer, multiple_choice.load_task(name[3:])[:limit])
        else:
            new_tokens = min(max_new_tokens, model.config.max_seq_len // 2)
            generator = Generator(model, params, SamplingConfig(max_new_tokens=new_tokens), mesh)
            complete_fn = lambda prompts: complete(generator, tokenizer, list(prompts), humaneval.STOP_SEQUENCES,
                                                   batch_size, truncate=True)
            results[name] = humaneval.evaluate(complete_fn, humaneval.problems()[:limit], batch_size=batch_size,
                                               progress=progress)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    return results


def in_training(config: Config, model, tokenizer_path: str):
    """params -> results of `train.eval_tasks`, run with the training mesh's params as they are (the
    training loop's eval hook; `jaxlm train` hands it to `training.pretrain.train`)."""
    for task in config.train.eval_tasks:
        check_task(task, config.model)
    tokenizer = tokenizer_lib.load(tokenizer_path)
    texts = heldout_texts(config) if "perplexity" in config.train.eval_tasks else None
    limit = config.train.eval_limit or None
    # Kept across evals: its jitted forward compiles once per shape.
    scorer = None if config.model.encoder_decoder or config.model.encoder_only else Scorer(model, None)
    return lambda params: run_tasks(model, params, tokenizer, config, list(config.train.eval_tasks),
                                    texts=texts, limit=limit, progress=False, scorer=scorer)
