"""`jaxlm serve`: an OpenAI-compatible HTTP server over a run's checkpoint, with continuous batching."""

from __future__ import annotations

import os
import signal
import socket

from jaxlm.commands.args import QUANT_FORMATS, STEP, bounded, like
from jaxlm.core.config import ConfigError, ServeConfig

API_KEY_ENV = "JAXLM_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a run over the OpenAI API (continuous batching)",
        description="Serve the latest checkpoint of a run directory over HTTP with OpenAI's API: "
                    "/v1/completions, /v1/chat/completions (with the run's chat template), /v1/models, streaming "
                    "or not; plus /health and Prometheus /metrics. Requests share a batch of decode slots and join "
                    "it between steps. SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish "
                    "within --grace-period seconds, and exits 0.")
    p.add_argument("run_dir", help="a run directory (from `jaxlm train`, `jaxlm finetune` or `jaxlm convert from-hf`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 serves every interface)")
    p.add_argument("--port", type=bounded(int, ge=0, le=65535), default=8000,
                   help="port to bind (default 8000; 0 picks a free one, printed at start)")
    p.add_argument("--max-batch", type=like(ServeConfig, "max_batch"), default=ServeConfig.max_batch,
                   help=f"decode slots: sequences generated at once (default {ServeConfig.max_batch})")
    p.add_argument("--prefill-chunk", type=like(ServeConfig, "prefill_chunk"), default=ServeConfig.prefill_chunk,
                   help="prompt tokens prefilled between two decode steps, at most; longer prompts take several "
                        f"(default {ServeConfig.prefill_chunk})")
    p.add_argument("--max-queue", type=like(ServeConfig, "max_queue"), default=ServeConfig.max_queue,
                   help=f"requests waiting beyond the busy slots; more get HTTP 429 (default {ServeConfig.max_queue})")
    p.add_argument("--grace-period", type=like(ServeConfig, "grace_period"), default=ServeConfig.grace_period,
                   help=f"seconds SIGTERM waits for requests in flight (default {ServeConfig.grace_period:g})")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--quantize", choices=QUANT_FORMATS, help="weight-only quantize the params first")
    p.add_argument("--step", type=STEP, help="checkpoint step to serve (default: the latest)")
    p.add_argument("--chat-template", help="a .jinja chat template to use instead of the run's own")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    sock = _bind(args.host, args.port)  # before loading, so a taken port fails at once
    served = _load(args)
    from jaxlm.serving.api import create_app

    app = create_app(served)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.run_dir} as '{served.model_name}' on http://{host}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.grace_period))
    # uvicorn re-raises the SIGTERM or SIGINT it handled once it has shut down; ignoring that second one exits
    # with 0 and no KeyboardInterrupt traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("server stopped", flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port or --host") from None
    sock.listen(2048)
    return sock


def _load(args):
    import logging

    from jaxlm.data import chat
    from jaxlm.inference.load import DECODER_ONLY, load_run
    from jaxlm.serving.api import Served
    from jaxlm.serving.engine import SlotEngine
    from jaxlm.serving.metrics import ServerMetrics
    from jaxlm.serving.scheduler import Scheduler

    config = ServeConfig(args.max_batch, args.prefill_chunk, args.max_queue, args.grace_period)
    loaded = load_run(args.run_dir, args.step, quantize=args.quantize, architectures=DECODER_ONLY,
                      purpose="jaxlm serve")
    template = chat.load(args.chat_template or "", model_dir=loaded.directory)
    engine = SlotEngine(loaded.model, loaded.params, config.max_batch, config.prefill_chunk, loaded.mesh)
    log = logging.getLogger("jaxlm.serve")
    log.info("compiling the decode step for %s busy rows and prefill for %s-token chunks", engine.decode_widths,
             engine.buckets)
    log.info("compiled %d programs", engine.compile())
    metrics = ServerMetrics()
    metrics.compiled.set_function(engine.compiled_programs)
    scheduler = Scheduler(engine, loaded.tokenizer.eos_id(), config.max_queue, metrics)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
    name = args.model_name or os.path.basename(os.path.normpath(loaded.directory))
    return Served(scheduler, loaded.tokenizer, template, name, api_key)
