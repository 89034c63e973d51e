"""A run's decoder as ONNX graphs that onnxruntime runs without JAX (`jaxlm export onnx RUN OUT`).

OUT holds, in float32 (dims named in quotes are dynamic; L layers, K KV heads, H head dim, V vocabulary):

  model.onnx               the full causal forward pass of whole rows at positions 0..seq-1
                           input_ids ("batch", "seq") int32 -> logits ("batch", "seq", V) float32
  decoder_with_past.onnx   the KV-cached forward pass: a prompt (prefill) or one token (a step)
                           input_ids, position_ids ("batch", "seq") int32,
                           past_key, past_value (L, "batch", "cache", K, H) float32,
                           slot () int32: the cache slot of input_ids[:, 0],
                           valid ("batch", "cache") bool: the slots holding tokens, those written now included
                           -> logits ("batch", "seq", V), present_key, present_value (L, "batch", "cache", K, H)
  *.onnx.data              each graph's weights (ONNX external data, so that no size limit applies)
  onnx_config.json         the graphs' inputs and outputs, the cache's dims and the special token ids
  tokenizer files          those of the run (tokenizer.json or tokenizer.model, its config, chat template)

`greedy` below is the whole decoding loop on these files, numpy and onnxruntime alone.

The converter is jax2onnx 0.12.5: later releases cap orbax-checkpoint below the 0.12 jaxlm uses. Its tracing
shapes three choices here:
  - it cannot trace flax's `nn.scan`, so the layers are unrolled (`layers_{i}` params, sliced off the stack);
  - its `jnp.arange` of a symbolic length gives an array of unknown length that no longer broadcasts against
    the input (`_iota_arange` fixes that);
  - the reference attention splits the queries into blocks with Python loops over the sequence length, which
    needs a fixed length; the cached attention takes any length, so model.onnx runs the cached path over a
    fresh cache as long as the input. The result is the same causal attention.
Mixture-of-experts models are refused: their dispatch picks its blocks from the number of tokens with Python
comparisons, which fail on the graphs' symbolic batch and sequence lengths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil

import numpy as np

from jaxlm.core import atomic
from jaxlm.core.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

INSTALL = "pip install 'jaxlm[onnx]'"
FULL, STEP, CONFIG = "model.onnx", "decoder_with_past.onnx", "onnx_config.json"
OPSET = 20  # Gelu (GPT-2) needs 20; onnxruntime 1.17 (2024) and later run it


def signatures(c: ModelConfig) -> dict[str, tuple[dict, dict]]:
    """Each graph's (inputs, outputs): name -> (dtype, dims), a string naming a dynamic dim."""
    kv = ("float32", (c.num_layers, "batch", "cache", c.num_kv_heads, c.resolved_head_dim))
    tokens, logits = ("int32", ("batch", "seq")), ("float32", ("batch", "seq", c.vocab_size))
    return {
        FULL: ({"input_ids": tokens}, {"logits": logits}),
        STEP: ({"input_ids": tokens, "position_ids": tokens, "past_key": kv, "past_value": kv,
                "slot": ("int32", ()), "valid": ("bool", ("batch", "cache"))},
               {"logits": logits, "present_key": kv, "present_value": kv}),
    }


def export(run_dir: str, out: str, step: int | None = None) -> str:
    """Writes the checkpoint `step` (default: the latest) of `run_dir` as the ONNX directory `out`, which
    must not exist or be empty; it appears only once complete."""
    from jaxlm.core import overrides, rundir
    from jaxlm.hf import tokenizer as hf_tokenizer
    from jaxlm.inference.load import DECODER_ONLY, load_run

    convert = _converter()
    run_dir, out = os.path.abspath(os.path.expanduser(run_dir)), os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):  # before the checkpoint is read
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    if os.path.isfile(os.path.join(run_dir, rundir.CONFIG)):  # refuse a model before reading its checkpoint
        export_config(overrides.load([os.path.join(run_dir, rundir.CONFIG)]).model)
    run = load_run(run_dir, step, architectures=DECODER_ONLY, purpose="jaxlm export onnx")
    config = export_config(run.model.config)
    fns = graph_functions(config, host_params(run.params, config))
    with atomic.new_directory(out) as tmp:
        for name, (inputs, outputs) in signatures(config).items():
            log.info("writing %s", name)
            _write_graph(convert, fns[name], inputs, outputs, os.path.join(tmp, name))
        tokenizer_file = hf_tokenizer.copy_files(run.directory, tmp)
        atomic.write_json(os.path.join(tmp, CONFIG), describe(config, run, tokenizer_file))
    return out


def _converter():
    """(jax2onnx's `to_onnx`, `onnx.save_model`), or a one-line error naming the extra that installs them."""
    try:
        import onnx
        from jax2onnx import to_onnx
        from jax2onnx.plugins import plugin_system
    except ImportError as e:
        raise ConfigError(f"jaxlm export onnx needs the onnx packages ({e.name} is missing): {INSTALL}") from None
    _load_plugins(plugin_system)
    return to_onnx, onnx.save_model


def _load_plugins(plugin_system) -> None:
    """Registers jax2onnx's plugins for JAX and Flax only (3 s). Its own discovery, on the first conversion,
    imports every plugin tree, and the Equinox one compiles some 70 programs as it is imported (10-15 s on
    two cores) for models jaxlm never has. Private names of the pinned release: without them, discovery runs."""
    import pathlib

    if not hasattr(plugin_system, "_import_tree") or getattr(plugin_system, "_already_imported_plugins", True):
        return
    root = pathlib.Path(plugin_system.__file__).parent
    with _quiet():
        for tree in ("jax", "flax"):
            plugin_system._import_tree(root / tree, f"jax2onnx.plugins.{tree}")
    plugin_system._already_imported_plugins = True


def export_config(c: ModelConfig) -> ModelConfig:
    """The model as exported: float32, the reference attention, layers unrolled (see the module docstring)."""
    if c.architecture not in ("llama", "gpt2"):
        raise ConfigError(f"this run is a model.architecture={c.architecture} model; ONNX export writes decoder-only "
                          "models (llama, gpt2). Export it to Hugging Face with jaxlm convert to-hf instead")
    if c.num_experts:
        raise ConfigError(f"this run is a mixture-of-experts model ({c.num_experts} experts), which ONNX export does "
                          "not support: its expert dispatch sizes its blocks from the token count, which the graphs "
                          "leave free; export a dense model")
    return dataclasses.replace(c, dtype="float32", param_dtype="float32", attention="xla", scan_layers=False,
                               remat="none")


def host_params(params, c: ModelConfig) -> dict:
    """The params as float32 numpy arrays on the host, scanned layers unstacked into `layers_{i}`."""
    import jax

    from jaxlm.model.transformer import unstack_layers

    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    return unstack_layers(params, c.num_layers) if "layers" in params else params


def graph_functions(c: ModelConfig, params: dict) -> dict:
    """The function each graph is traced from, with the params as constants."""
    import jax.numpy as jnp

    from jaxlm.model.transformer import Transformer

    model = Transformer(c)

    def full(input_ids):  # a fresh cache as long as the rows, every slot written by this call
        b, t = input_ids.shape
        cache = jnp.zeros((c.num_layers, b, t, c.num_kv_heads, c.resolved_head_dim), jnp.float32)
        decode = {"slot": jnp.int32(0), "valid": jnp.ones((b, t), bool)}
        with _iota_arange():
            logits, _ = model.apply({"params": params}, input_ids, None, None, {"k": cache, "v": cache}, decode)
        return logits

    def step(input_ids, position_ids, past_key, past_value, slot, valid):
        with _iota_arange():
            logits, cache = model.apply({"params": params}, input_ids, position_ids, jnp.ones_like(input_ids),
                                        {"k": past_key, "v": past_value}, {"slot": slot, "valid": valid})
        return logits, cache["k"], cache["v"]

    return {FULL: full, STEP: step}


@contextlib.contextmanager
def _iota_arange():
    """While tracing, `jnp.arange(n)` of a symbolic length n becomes `lax.iota`, whose length stays n.

    jax2onnx replaces jnp.arange with its own primitive, which gives such an arange an unknown length: the
    model's `jnp.arange(tokens.shape[1])` then fails to broadcast against the tokens."""
    import jax
    import jax.numpy as jnp

    converters = jnp.arange

    def arange(*args, **kwargs):
        if len(args) == 1 and not kwargs and jax.export.is_symbolic_dim(args[0]):
            return jax.lax.iota(jnp.int32, args[0])
        return converters(*args, **kwargs)

    jnp.arange = arange
    try:
        yield
    finally:
        jnp.arange = converters


def _write_graph(convert, fn, inputs: dict, outputs: dict, path: str) -> None:
    import jax

    to_onnx, save_model = convert
    # One scope for all the symbols: the cache is declared at least as long as the tokens written into it.
    symbols = dict(zip(("batch", "seq", "cache"),
                       jax.export.symbolic_shape("batch, seq, cache", constraints=("cache >= seq",))))
    specs = [jax.ShapeDtypeStruct(tuple(symbols.get(d, d) for d in dims), np.dtype(dtype))
             for dtype, dims in inputs.values()]
    with _quiet():
        proto = to_onnx(fn, specs, model_name=os.path.splitext(os.path.basename(path))[0], opset=OPSET,
                        input_names=list(inputs), output_names=list(outputs))
    for value in (*proto.graph.input, *proto.graph.output):  # the converter numbers the dims it derives
        dims = {**inputs, **outputs}[value.name][1]
        for dim, want in zip(value.type.tensor_type.shape.dim, dims):
            if isinstance(want, str):
                dim.dim_param = want
    # External data keeps a graph of any size loadable (a protobuf holds at most 2 GiB).
    # Small tensors stay inline: onnxruntime's shape inference reads scalar constants from the graph itself.
    save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
               location=os.path.basename(path) + ".data", size_threshold=1024)
    shutil.copymode(path, path + ".data")  # onnx creates it readable by its owner alone


@contextlib.contextmanager
def _quiet():
    """Holds back the converter's log: a traceback for each optional plugin its JAX version lacks, a line per
    traced function on the root logger, and a warning per unnamed shape value."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def describe(c: ModelConfig, run, tokenizer_file: str | None) -> dict:
    """onnx_config.json: what a program driving the graphs needs to know."""
    tok = run.tokenizer
    as_json = lambda table: {k: {"dtype": dtype, "shape": list(dims)} for k, (dtype, dims) in table.items()}
    return {
        "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}", "opset": OPSET,
        "run": run.directory, "step": run.step, "architecture": c.architecture, "vocab_size": c.vocab_size,
        "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.resolved_head_dim,
        "max_seq_len": c.max_seq_len, "sliding_window": c.sliding_window,
        "bos_id": tok.bos_id(), "eos_id": tok.eos_id(), "pad_id": tok.pad_id(), "tokenizer": tokenizer_file,
        "graphs": {name: {"inputs": as_json(i), "outputs": as_json(o)} for name, (i, o) in signatures(c).items()},
        "cache": "decoder_with_past.onnx writes the keys and values of input_ids at cache slots slot..slot+seq-1 "
                 "and returns the whole cache; start from zeros of (num_layers, batch, cache, num_kv_heads, "
                 "head_dim) with cache >= prompt + new tokens (and <= max_seq_len). Left-pad a batch of prompts: "
                 "pad slots stay invalid, and position_ids count from each row's first real token.",
    }


def greedy(session_dir: str, prompt_tokens: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of one prompt on an exported directory with onnxruntime: up to `max_new_tokens`
    tokens, ending before EOS. Only numpy and onnxruntime run, so this function's body is the loop to copy
    into a program without jaxlm: one call prefills the prompt into slots 0..p-1, then each call feeds the
    last token at its slot."""
    import onnxruntime

    with open(os.path.join(session_dir, CONFIG)) as f:
        cfg = json.load(f)
    p, total = len(prompt_tokens), len(prompt_tokens) + max_new_tokens
    if not p or total > cfg["max_seq_len"]:
        raise ConfigError(f"a prompt of {p} tokens + max_new_tokens={max_new_tokens} must be 1 to "
                          f"{cfg['max_seq_len']} tokens (the model's context)")
    session = onnxruntime.InferenceSession(os.path.join(session_dir, STEP), providers=["CPUExecutionProvider"])
    cache = np.zeros((cfg["num_layers"], 1, total, cfg["num_kv_heads"], cfg["head_dim"]), np.float32)
    feed = {"input_ids": np.array([prompt_tokens], np.int32), "position_ids": np.arange(p, dtype=np.int32)[None],
            "past_key": cache, "past_value": cache, "slot": np.array(0, np.int32), "valid": np.arange(total)[None] < p}
    out = []
    for slot in range(p, total):
        logits, feed["past_key"], feed["past_value"] = session.run(None, feed)
        token = int(logits[0, -1].argmax())  # the first of equal maxima, as jnp.argmax picks
        if token == cfg["eos_id"]:
            break
        out.append(token)
        feed.update(input_ids=np.array([[token]], np.int32), position_ids=np.array([[slot]], np.int32),
                    slot=np.array(slot, np.int32), valid=np.arange(total)[None] <= slot)
    return out
