"""`jaxlm finetune`: SFT, DPO or a reward model from a base model, fully or through LoRA / QLoRA, top to bottom.

config -> the base's shape -> run directory check -> multi-host setup -> mesh -> tokenizer and chat template
-> data (bad rows counted, packed first-fit) -> the one run assembly (base params, adapters, optimizer with
the trainable mask; [DPO: reference log-probs from the starting model]; the latest checkpoint restored) ->
the one loop -> adapters and merged model (a run directory that `jaxlm generate` and `jaxlm convert to-hf`
read).

Checkpoints: a full finetune checkpoints its whole train state in `<run>/checkpoints`, which is also the
model that generate and export read. A LoRA run checkpoints only the adapters, their optimizer state and
the step in `<run>/train_state` (the frozen base is rebuilt from `model.init_from` on resume), and writes the
merged model to `<run>/checkpoints` when it finishes.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.core import atomic, rundir
from jaxlm.core.config import RL_TASKS, Config, ConfigError
from jaxlm.core.overrides import to_dict
from jaxlm.core.sharding import global_batch
from jaxlm.data import chat, objective_rows, packing, pipeline, tokenizer as tokenizer_lib
from jaxlm.model import lora as lora_lib
from jaxlm.training import assembly, base, dpo, reward, rl, seq2seq, sft
from jaxlm.training.checkpoint import save_params
from jaxlm.training.evaluate import Evaluator
from jaxlm.training.loop import LoopResult
from jaxlm.training.metrics import MetricsWriter
from jaxlm.training.pretrain import RunSummary, open_run, run_dir_of, start

log = logging.getLogger("jaxlm.finetune")


@dataclasses.dataclass
class FinetuneSummary(RunSummary):
    data: str = ""  # rows used and skipped, by reason
    base_mib: float = 0.0
    adapters: str | None = None  # <run>/adapters, for LoRA runs
    merged: str | None = None  # the model checkpoint generate and export read
    eval_before: dict = dataclasses.field(default_factory=dict)
    scores: bool = False  # a reward model: it scores text rather than generating it


def chatterbot_rows(language: str) -> list[tuple[str, dict]]:
    """Conversations of chatterbot-corpus (user and assistant alternating), as chat-message rows."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise ConfigError("finetune.data=chatterbot:... needs the chatterbot-corpus package: "
                          "pip install chatterbot-corpus==1.3.3")
    folder = os.path.join(os.path.dirname(spec.origin), "data", language)
    files = sorted(glob.glob(os.path.join(folder, "*.yml")))
    if not files:
        raise ConfigError(f"chatterbot-corpus has no language '{language}'; try english or chinese")
    rows = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for k, turns in enumerate(doc.get("conversations") or []):
            turns = turns if isinstance(turns, list) else [turns]
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "" if t is None else str(t)}
                        for i, t in enumerate(turns)]
            rows.append((f"{os.path.basename(path)}#{k}", {"messages": messages}))
    return rows


def read_rows(config: Config) -> list[tuple[str, object]]:
    data = config.finetune.data
    if data.startswith("chatterbot:"):
        return chatterbot_rows(data.split(":", 1)[1])
    return sft.read_jsonl(os.path.expanduser(data))


def load_tokenizer(config: Config):
    """(tokenizer, its file): the base's, `data.tokenizer`, or one trained on the finetuning text itself
    (random weights and no tokenizer given: tests and smoke runs)."""
    if config.data.tokenizer:
        return tokenizer_lib.load(config.data.tokenizer), config.data.tokenizer
    texts = [str(m.get("content", "")) for _, row in read_rows(config) if isinstance(row, dict)
             for m in (row.get("messages") or []) if isinstance(m, dict)]
    texts += [str(row.get(k, "")) for _, row in read_rows(config) if isinstance(row, dict)
              for k in ("prompt", "response", "chosen", "rejected", "input", "target") if isinstance(row.get(k), str)]
    return tokenizer_lib.get(texts + [chat.CHATML], config.model.vocab_size, config.data.tokenizer_type, "",
                             config.data.cache_dir)


# Tasks trained on preference pairs (prompt, chosen, rejected): their row builders.
PAIRS = {"dpo": dpo.build_rows, "reward": reward.build_rows}


def build_data(config: Config, template: chat.Template, tokenizer, seq_len: int):
    """(train rows, eval rows or None, report): arrays with a leading row axis, for the grain iterator."""
    report = sft.Report()
    rows = read_rows(config)
    rows = sft.drop_repeats(rows, report) if config.finetune.drop_repeats else rows
    order = np.random.default_rng(config.train.seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    encode = lambda text: list(tokenizer.encode(text))
    target_len = objective_rows.target_length(config)
    if config.task in PAIRS:
        data = PAIRS[config.task](rows, template, encode, seq_len, report)
        n = len(data["chosen_inputs"])
    elif config.model.encoder_decoder:
        examples = seq2seq.build_examples(rows, encode, tokenizer.eos_id(), seq_len, target_len, report)
        n = len(examples)
    else:
        examples = sft.build_examples(rows, template, encode, seq_len, report)
        n = len(examples)
    log.info("finetuning data %s: %s", config.finetune.data, report.summary())
    if n == 0:
        raise ConfigError(f"finetune.data={config.finetune.data} has no usable row ({report.summary()})")
    # Hold out whole examples for an eval loss, when there are enough of them.
    b = config.train.batch_size
    n_eval = max(int(n * config.data.eval_fraction), b) if n >= 4 * b else 0
    if config.task in PAIRS:
        split = lambda sl: {k: v[sl] for k, v in data.items()}
        train, held = split(slice(n_eval, None)), (split(slice(0, n_eval)) if n_eval else None)
    elif config.model.encoder_decoder:
        pack = lambda part, packed: seq2seq.pack(part, seq_len, target_len, packed, config.model.decoder_start_id)
        train, held = pack(examples[n_eval:], config.finetune.pack), (pack(examples[:n_eval], False) if n_eval else None)
    else:
        train = sft.pack(examples[n_eval:], seq_len, config.finetune.pack)
        held = sft.pack(examples[:n_eval], seq_len, pack_rows=False) if n_eval else None  # >= batch_size rows
    rows_n = len(next(iter(train.values())))
    if rows_n < b:
        raise ConfigError(f"the data packs into {rows_n} rows, fewer than train.batch_size={b}; lower the batch size")
    return train, held, report


def _reference(config: Config, rows: list, mesh, batch_size: int, progress: bool):
    """before_restore(starting state): fills the DPO reference log-probs the data does not bring, from
    `finetune.reference` or else the starting model (for LoRA: B = 0, the base)."""

    def fill(state, spec):
        params, apply = state.params, spec.apply_fn
        if config.finetune.reference:
            model, params = base.run_model(config.finetune.reference, mesh)
            apply = model.apply
        for r in rows:
            if r is not None:
                dpo.fill_reference(apply, params, r, batch_size, progress)

    return fill


def finetune(config: Config, sampler=None) -> FinetuneSummary:
    """Finetunes per `config` (config.task is sft, dpo, reward, grpo or ppo), resuming from the run's latest
    checkpoint. GRPO and PPO sample with `sampler` (`jaxlm.inference.generate.Generator`, from the command)."""
    if config.task not in ("sft", "dpo", "reward", *RL_TASKS):
        raise ConfigError(f"task={config.task!r}: jaxlm finetune runs task=sft, dpo or reward, jaxlm rl grpo or ppo")
    config = base.resolve(config)
    run_dir = run_dir_of(config)
    model_dir = rundir.checkpoint_dir(run_dir, config.checkpoint.dir)  # what generate and export read
    ckpt_dir = os.path.join(run_dir, rundir.TRAIN_STATE) if config.lora.targets else model_dir
    rd, changes, latest = open_run(config, ckpt_dir)
    mesh = start(config)
    assembly.check_batch(config, mesh)
    t, primary = config.train, jax.process_index() == 0

    tok, tok_path = load_tokenizer(config)
    # Chat template: the given file, the base model's, or ChatML. A tokenizer that does not read special
    # tokens in text (sentencepiece) gets its BOS as an id first.
    bos_first = not tok.special_tokens_in_text and tok.bos_id() >= 0
    template = chat.load(config.finetune.chat_template, base.template_dir(config),
                         prefix_ids=(tok.bos_id(),) if bos_first else ())
    if config.task in RL_TASKS:
        train_rows, report = rl.load_prompts(config, template, lambda text: list(tok.encode(text)))
        eval_rows = None
        log.info("prompts %s: %s", config.rl.prompts, report.summary())
    else:
        train_rows, eval_rows, report = build_data(config, template, tok, t.seq_len)

    spec = assembly.build(config)
    with jax.set_mesh(mesh):
        done = latest is not None and latest >= t.steps
        dpo_refs = config.task == "dpo" and not done
        need_base = spec.lora is not None or dpo_refs or latest is None or config.task in RL_TASKS
        params = base.load_params(config, spec.model, mesh, t.progress) if need_base else None
        # GRPO's reference is the starting model: a full finetune keeps a copy (a LoRA one turns its adapters off).
        ref = jax.tree.map(jax.numpy.copy, params) if config.task in RL_TASKS and spec.lora is None else None
        fill = _reference(config, [train_rows, eval_rows], mesh, t.batch_size, t.progress and primary) if dpo_refs else None
        run = assembly.assemble(spec, mesh, ckpt_dir, params, fill and (lambda state: fill(state, spec)))
        del params
        if config.task in RL_TASKS and spec.lora is None and ref is None:  # random start: the seed's own weights
            ref = assembly.initial_state(spec, run.abstract, mesh).params
        if done and run.start < t.steps and config.task == "dpo":  # the latest step was damaged and set aside
            run.ckpt.close()
            raise ConfigError(f"the latest checkpoint in {ckpt_dir} was damaged and set aside; run the same command "
                              f"again to resume from step {run.start}")
        done = run.start >= t.steps
        base_mib = _nbytes(run.state.params if spec.lora is None else run.state.params["base"]) / 2**20
        log.info("base params %.1f MiB%s", base_mib,
                 f" ({config.lora.quantize})" if config.lora.quantize != "none" else "")
        evaluate = _evaluator(config, spec, eval_rows, mesh)
        eval_before = evaluate(run.state.params) if evaluate and not run.resumed else {}
        if not done:
            if primary:
                rd.begin_segment(to_dict(config), run.start)
                tokenizer_lib.copy_into(tok_path, rd.directory)
                atomic.write_text(rd.path(rundir.CHAT_TEMPLATE), template.source)
                base.copy_files(config, rd.directory)
            if config.task in RL_TASKS:
                result, state = _train_rl(run, rd, train_rows, tok, ref, sampler)
            else:
                result, state = _train(run, rd, train_rows, evaluate, eval_before)
        else:
            log.info("the run is already complete at step %d (train.steps=%d); writing its outputs", run.start, t.steps)
            run.ckpt.close()
            result, state = LoopResult(run.start, None, 0, {}), run.state
        summary = FinetuneSummary(rd.directory, result.step, run.ckpt.directory, result.stopped_by, result.skipped,
                                  result.last, changes, report.summary(), base_mib,
                                  eval_before={k[5:]: v for k, v in eval_before.items()},
                                  scores=config.model.num_labels > 0)
        if not result.stopped_by:  # else a checkpoint holds the position; the same command resumes
            _write_outputs(config, spec, state, rd, model_dir, summary)
    return summary


def _evaluator(config: Config, spec, rows, mesh) -> Evaluator | None:
    """The held-out rows' loss (and the objective's other metrics), over whole batches."""
    if rows is None:
        return None
    b = config.train.batch_size
    n = len(next(iter(rows.values())))
    batches = [global_batch(x, mesh) for x in pipeline.eval_batches(packing.ArrayRows(rows), b, n // b)]
    return Evaluator(assembly.objective(config, spec, train=False), batches)


def _train(run, rd, rows, evaluate, eval_before):
    t = run.spec.config.train
    batches = pipeline.BatchIterator(packing.ArrayRows(rows), t.batch_size, t.seed, run.spec.config.data.workers,
                                     start=run.start, saved=run.data_state)
    objective = assembly.objective(run.spec.config, run.spec)
    first = global_batch(next(batches), run.mesh)
    compiled = assembly.compile_step(run.spec, objective, run.state, first)
    writer = MetricsWriter(rd.directory)
    if eval_before:
        writer.write(0, eval_before)
    state, result = assembly.run_loop(run, rd.directory, compiled, first, batches, evaluate, writer)
    return result, state


def _train_rl(run, rd, prompts, tokenizer, ref, sampler):
    """GRPO's and PPO's loop: the batches are rollouts of the policy being trained (`rl.RolloutSource`)."""
    writer = MetricsWriter(rd.directory)
    source = rl.RolloutSource(run, prompts, tokenizer, ref, rd.directory, writer, sampler)
    try:
        first = global_batch(next(source), run.mesh)
        compiled = assembly.compile_step(run.spec, assembly.objective(run.spec.config, run.spec), run.state, first)
        state, result = assembly.run_loop(run, rd.directory, compiled, first, source, None, writer,
                                          extra_hooks=(rl.Follow(source),))
    finally:
        source.close()
    return result, state


def _write_outputs(config: Config, spec, state, rd, model_dir: str, summary: FinetuneSummary) -> None:
    """LoRA: the adapters on their own, and the merged model for generate and export. A full finetune's
    model is its checkpoint."""
    lo = spec.lora
    if lo is None:
        summary.merged = summary.checkpoints
        return
    adapters = multihost_utils.process_allgather(state.params["lora"], tiled=True)  # every host takes part
    if jax.process_index() == 0:
        lora_lib.save_adapters(rd.path(rundir.ADAPTERS), adapters, config.lora)
    summary.adapters = rd.path(rundir.ADAPTERS)
    if config.finetune.save_merged:
        from jaxlm.model.quantize import dequantize_params

        merged = dequantize_params(jax.jit(lo.merge)(state.params["base"], state.params["lora"]))
        save_params(model_dir, merged, config.train.steps, to_dict(config), config.checkpoint,
                    config.train.seed)  # QLoRA: the saved model is a plain float one
        summary.merged = model_dir


def _nbytes(tree) -> int:
    """Bytes of the arrays in a pytree; a quantized weight counts its codes and scales."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
