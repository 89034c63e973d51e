"""`jaxlm data prepare` and `jaxlm data from-seqio`: training data as prepared ArrayRecord shards."""

from __future__ import annotations

import argparse

from jaxlm.commands.args import Parser, like
from jaxlm.core.config import ConfigError, PrepareConfig, TrainConfig


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare training data").add_subparsers(
        dest="data_command", metavar="COMMAND", required=True)
    # The settings (field=value words) may come before or after --out, which argparse's positional
    # handling cannot mix; the prepare words are parsed by their own parser (prepare_parser), whose
    # help is shown here.
    p = data.add_parser("prepare", help="raw text to clean, deduplicated, tokenized shards", add_help=False,
                        usage=argparse.SUPPRESS, description=prepare_parser().format_help(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", dest="show_help", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=prepare)
    _add_from_seqio(data)


def prepare_parser() -> argparse.ArgumentParser:
    """The parser of `jaxlm data prepare`'s own words (inputs, field=value settings and flags, in any order)."""
    p = Parser(
        prog="jaxlm data prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Normalise, filter, scrub PII, deduplicate (exact and MinHash), decontaminate and tokenize "
                    "raw .txt/.jsonl/.parquet files into ArrayRecord shards plus manifest.json. A re-run resumes.\n"
                    "Settings are field=value words (see PrepareConfig in jaxlm/core/config.py), e.g.\n"
                    "  jaxlm data prepare 'raw/*.jsonl' --out data/web text_field=content vocab_size=16000 \\\n"
                    "      languages='(\"en\",\"zh\")' minhash_threshold=0.7 decontaminate='(\"evals/*.jsonl\",)'",
    )
    p.add_argument("words", nargs="+", metavar="INPUT|field=value", help="input files or globs, and settings")
    p.add_argument("--out", required=True, help="output folder (created; a re-run with the same inputs resumes)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: processes on this machine (default); ray: tasks on a Ray cluster, with the same "
                        "stages, settings and byte-identical output (pip install 'jaxlm[ray]')")
    p.add_argument("--ray-address", default="", metavar="auto|HOST:PORT",
                   help="the Ray cluster to join (auto: the one running here); without it --engine ray starts a "
                        "local cluster with `workers` CPUs. The output folder must be visible to every node")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _add_from_seqio(data) -> None:
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
    p.set_defaults(func=from_seqio)


def prepare(args) -> int:
    from jaxlm.data.prepare import run as preparer

    if args.show_help or not args.argv:
        prepare_parser().print_help()
        return 0
    args = prepare_parser().parse_intermixed_args(args.argv)
    inputs = [w for w in args.words if "=" not in w]
    if not inputs:
        raise ConfigError("give input files or globs, e.g. jaxlm data prepare 'raw/*.jsonl' --out data/mine")
    manifest = preparer.prepare(inputs, args.out, preparer.parse_config([w for w in args.words if "=" in w]),
                               progress=not args.no_progress, engine=args.engine, ray_address=args.ray_address)
    _print_skipped(manifest)
    print(f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards: "
          f"{args.out}/manifest.json\ntrain on it with: jaxlm train tiny data.prepared='{args.out}'")
    return 0


def _print_skipped(manifest: dict) -> None:
    """One line per input file that lost documents, per stage that dropped some, and for the PII replaced."""
    for f in manifest["files"]:
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


def from_seqio(args) -> int:
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
