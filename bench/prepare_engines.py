"""`jaxlm data prepare` on the local engine and on Ray, at 1 and 2 workers, on the same corpus.

    .venv/bin/python bench/prepare_engines.py [--quick] [--out results.json]

The corpus: every KJV chapter and People's Daily document as JSONL, plus near copies of a tenth of them
(bench/near_dup_grades.py's 2% unit edits) and exact copies of another twentieth, so both dedup stages
have work. Each configuration prepares it from scratch into its own folder; Ray starts a local cluster with
`workers` CPUs (its start-up is part of the total). Prints wall seconds and documents/s per stage, Ray's
overhead at one worker, and checks that all four outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import tempfile
import time

from jaxlm.core.config import PrepareConfig
from jaxlm.data import corpus
from jaxlm.data.prepare import run as prepare
from jaxlm.data.prepare.units import cjk_fraction

RUNS = (("local", 1), ("ray", 1), ("local", 2), ("ray", 2))
STAGES = ("clean", "exact_dedup", "near_dedup", "keep", "tokenizer", "shards")


def _grades():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "near_dup_grades.py")
    spec = importlib.util.spec_from_file_location("near_dup_grades", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_corpus(raw: str, quick: bool) -> int:
    grades, rng = _grades(), random.Random(0)
    en, zh = list(corpus.bible_chapters()), corpus.peoples_daily()
    if quick:
        en, zh = en[::4], zh[::4]
    docs = en + zh
    vocab = {"en": sorted({w for d in en for w in d.split()}), "zh": sorted({ch for d in zh for ch in d if cjk_fraction(ch, 1)})}
    for d in rng.sample(docs, len(docs) // 10):
        lang = "zh" if cjk_fraction(d[:200], 1) > 0.3 else "en"
        docs.append(grades.edit(d, 0.02, vocab[lang], lang, rng))
    docs += rng.sample(docs, len(docs) // 20)
    rng.shuffle(docs)
    os.makedirs(raw)
    with open(os.path.join(raw, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    return len(docs)


def stage_docs(m: dict) -> dict:
    """Documents entering each timed stage."""
    st = m["stages"]
    return {"clean": st["read"]["docs_in"], "exact_dedup": st["exact_dedup"]["docs_in"],
            "near_dedup": st["near_dedup"]["docs_in"], "keep": st["exact_dedup"]["docs_in"],
            "tokenizer": m["documents"], "shards": m["documents"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the corpus")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        n = build_corpus(os.path.join(tmp, "raw"), args.quick)
        mb = os.path.getsize(os.path.join(tmp, "raw", "corpus.jsonl")) / 1e6
        print(f"corpus: {n:,} documents, {mb:.1f} MB of JSONL; this machine has {os.cpu_count()} CPUs")
        outputs = {}
        for engine, workers in RUNS:
            out = os.path.join(tmp, f"{engine}{workers}")
            c = PrepareConfig(workers=workers, vocab_size=16000, docs_per_shard=500)
            t = time.perf_counter()
            m = prepare.prepare([os.path.join(tmp, "raw", "*.jsonl")], out, c, progress=False, engine=engine)
            total = time.perf_counter() - t
            results[f"{engine}-{workers}"] = {"total_seconds": total, "stage_wall_seconds": m["execution"]["stage_wall_seconds"],
                                              "stage_docs": stage_docs(m), "documents": m["documents"]}
            outputs[f"{engine}-{workers}"] = {s["file"]: open(os.path.join(out, s["file"]), "rb").read() for s in m["shards"]}
            print(f"  {engine} x{workers}: {total:.1f}s, {m['documents']:,} documents kept")
        first = next(iter(outputs.values()))
        identical = all(o == first for o in outputs.values())
    report(results, identical)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "identical": identical}, f, indent=1)


def report(results: dict, identical: bool) -> None:
    print(f"\n{'stage':<12}" + "".join(f"{k:>22}" for k in results))
    print(f"{'':<12}" + "".join(f"{'s':>10}{'docs/s':>12}" for _ in results))
    for stage in STAGES:
        line = f"{stage:<12}"
        for r in results.values():
            sec = r["stage_wall_seconds"].get(stage, 0.0)
            line += f"{sec:>10.2f}{r['stage_docs'][stage] / sec if sec else 0:>12,.0f}"
        print(line)
    print(f"{'total':<12}" + "".join(f"{r['total_seconds']:>10.2f}{r['stage_docs']['clean'] / r['total_seconds']:>12,.0f}"
                                     for r in results.values()))
    l1, r1 = results["local-1"]["total_seconds"], results["ray-1"]["total_seconds"]
    print(f"\nRay's overhead at 1 worker: {r1 / l1:.2f}x the local engine's wall time ({r1 - l1:+.1f}s)")
    for engine in ("local", "ray"):
        a, b = results[f"{engine}-1"]["total_seconds"], results[f"{engine}-2"]["total_seconds"]
        print(f"{engine}: 2 workers are {a / b:.2f}x as fast as 1")
    print(f"outputs byte-identical across the four runs: {identical}")


if __name__ == "__main__":
    main()
