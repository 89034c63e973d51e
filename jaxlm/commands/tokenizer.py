"""`jaxlm tokenizer train`: a sentencepiece model from text files."""

from __future__ import annotations

from jaxlm.commands.args import COUNT, bounded, like
from jaxlm.core.config import ConfigError, PrepareConfig


def add_parser(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tokenizer_command", metavar="COMMAND", required=True)
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
    p.add_argument("--extra-ids", type=bounded(int, ge=0, le=1000), default=0,
                   help="make the last N of the --vocab-size pieces T5's sentinels <extra_id_0>..<extra_id_N-1> "
                        "(<extra_id_0> the last id), for span corruption")
    p.set_defaults(func=train)


def train(args) -> int:
    import time

    from jaxlm.data import readers, tokenizer
    from jaxlm.data.prepare import normalize

    c = PrepareConfig(text_field=args.text_field)
    paths = readers.expand(args.inputs)
    lines = (line for p in paths for doc in readers.read(p, c, readers.FileStats(p))
             for line in normalize.normalize(doc).split("\n") if line.strip())
    start = time.perf_counter()
    try:
        tokenizer.train(lines, args.vocab_size, args.type, args.out, max_sentences=args.max_sentences,
                        extra_ids=args.extra_ids)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train a {args.vocab_size}-piece tokenizer: {e}") from None
    extra = f", the last {args.extra_ids} <extra_id_N>" if args.extra_ids else ""
    print(f"wrote {args.out} ({args.type}, {args.vocab_size} pieces{extra}, {time.perf_counter() - start:.1f}s, "
          f"sha256 {tokenizer.file_hash(args.out)})")
    return 0
