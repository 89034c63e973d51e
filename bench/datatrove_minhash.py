"""jaxlm's MinHash near-dedup against HuggingFace datatrove's, on the graded corpus of near_dup_grades.py.

    python3 -m venv /tmp/dtvenv
    /tmp/dtvenv/bin/pip install datatrove==0.10.1 spacy jieba "xxhash<4" regex tokenizers orjson
    .venv/bin/python bench/datatrove_minhash.py                 # recommended setting + old defaults
    .venv/bin/python bench/datatrove_minhash.py --setting 5,128,16,0.8 --quick

Two parts, two interpreters, so datatrove never shares an environment with jaxlm's pins:
  (a) jaxlm's venv (`main`): writes the graded corpus to OUT/corpus.jsonl ({"id": "<index>", "text", "lang"}) and one
      file per language for datatrove, times jaxlm's signatures + near_duplicates on the whole corpus, then
      launches (b) and scores both with near_dup_grades.score.
  (b) /tmp/dtvenv/bin/python on this same file with the `datatrove` subcommand (`datatrove_main`, which
      imports datatrove only): per language, datatrove's four stages (MinhashDedupSignature,
      MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter) under LocalPipelineExecutor with one
      worker, reading with JsonlReader; it writes the kept ids and the stage times as JSON.

Same n-gram size, buckets = bands, hashes per bucket = rows. What cannot be the same, and is reported:
  - datatrove tokenizes itself (spaCy; jieba words for Chinese), after simplify_text (lower case, no
    punctuation, digits -> 0); jaxlm's units are words or single CJK characters. So a Chinese 3-gram is
    three jieba words for datatrove but three characters for jaxlm.
  - datatrove's word tokenizer is one language per pipeline, so it runs once per language (as FineWeb-2
    does); its time is the sum. jaxlm runs once on the mixed corpus.
  - datatrove has no Jaccard verification: sharing one bucket makes a duplicate pair. jaxlm is shown at its
    threshold and at threshold 0 (bucket sharing alone, datatrove's rule).
  - datatrove hashes shingles with 64-bit xxhash (its default HashConfig), jaxlm with datasketch's 32-bit SHA-1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

DTVENV_PYTHON = "/tmp/dtvenv/bin/python"
# datatrove's language codes. Plain "zh" resolves to spaCy's multi-language tokenizer in 0.10.1 (its
# tokenizer table reads the "FALSE" default flags as true strings), which splits Chinese only at
# punctuation; "cmn" gets the intended jieba segmenter.
DT_LANGUAGE = {"en": "eng", "zh": "cmn"}


# ---- part (b): runs under /tmp/dtvenv, imports datatrove only ----

def datatrove_language(input_dir: str, work: str, language: str, ngram: int, bands: int, rows: int) -> dict:
    """datatrove's 4 MinHash stages on one language's JSONL folder; the kept ids and each stage's seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows)
    stages = {
        "signature": ([JsonlReader(input_dir), MinhashDedupSignature(f"{work}/sigs", config=config, language=language)], 1),
        # MinhashDedupBuckets needs tasks to be a multiple of the bucket count: one task per bucket
        "buckets": ([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)], bands),
        "cluster": ([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove_ids", config=config)], 1),
        "filter": ([JsonlReader(input_dir), MinhashDedupFilter(f"{work}/remove_ids"),
                    JsonlWriter(f"{work}/kept", compression=None)], 1),
    }
    seconds = {}
    for name, (pipeline, tasks) in stages.items():
        t0 = time.perf_counter()
        # a fresh logging_dir each run: datatrove skips tasks a logging_dir records as completed
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}").run()
        seconds[name] = time.perf_counter() - t0
    kept = []
    for fname in sorted(os.listdir(f"{work}/kept")):
        with open(os.path.join(f"{work}/kept", fname), encoding="utf-8") as f:
            kept += [int(json.loads(line)["id"]) for line in f if line.strip()]
    return {"seconds": seconds, "kept": kept}


def datatrove_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="datatrove_minhash.py datatrove")
    parser.add_argument("--input", required=True, help="folder with one subfolder of JSONL per language (en, zh)")
    parser.add_argument("--work", required=True)
    parser.add_argument("--ngram", type=int, required=True)
    parser.add_argument("--bands", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    import importlib.metadata

    out = {"version": importlib.metadata.version("datatrove"), "languages": {}}
    for lang in sorted(os.listdir(args.input)):
        work = os.path.join(args.work, lang)
        shutil.rmtree(work, ignore_errors=True)
        out["languages"][lang] = datatrove_language(os.path.join(args.input, lang), work, DT_LANGUAGE[lang],
                                                    args.ngram, args.bands, args.rows)
    with open(args.result, "w") as f:
        json.dump(out, f)


# ---- part (a): runs under jaxlm's venv ----

def write_corpus(out: str, texts: list[str], langs: list[str]) -> str:
    """OUT/corpus.jsonl with every text, and OUT/datatrove/input/<lang>/corpus.jsonl per language; returns the
    per-language folder."""
    per_lang = os.path.join(out, "datatrove", "input")
    shutil.rmtree(per_lang, ignore_errors=True)
    files = {}
    for la in sorted(set(langs)):
        os.makedirs(os.path.join(per_lang, la))
        files[la] = open(os.path.join(per_lang, la, "corpus.jsonl"), "w", encoding="utf-8")
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as everything:
        for i, (text, la) in enumerate(zip(texts, langs)):
            # a string id: datatrove's Document.id is a str, and its writers drop falsy fields (an int id 0)
            line = json.dumps({"id": str(i), "text": text, "lang": la}, ensure_ascii=False) + "\n"
            everything.write(line)
            files[la].write(line)
    for f in files.values():
        f.close()
    return per_lang


def run_jaxlm(texts: list[str], ngram: int, perms: int, bands: int, thresholds: list[float]) -> tuple[float, dict]:
    """Signing seconds, and per threshold (dedup seconds, dropped ids)."""
    import numpy as np

    from jaxlm.data.prepare import minhash

    ids = np.arange(len(texts), dtype=np.int64)
    t0 = time.perf_counter()
    sigs = minhash.signatures(texts, ngram, perms)
    sign = time.perf_counter() - t0
    results = {}
    for th in thresholds:
        t0 = time.perf_counter()
        dropped = minhash.near_duplicates(ids, sigs, bands, th)
        results[th] = (time.perf_counter() - t0, dropped)
    return sign, results


def run_datatrove(per_lang: str, out: str, ngram: int, bands: int, rows: int) -> dict:
    work, result = os.path.join(out, "datatrove", "work"), os.path.join(out, "datatrove", "result.json")
    log = os.path.join(out, "datatrove", f"sidecar_{ngram}_{bands}x{rows}.log")
    cmd = [DTVENV_PYTHON, os.path.abspath(__file__), "datatrove", "--input", per_lang, "--work", work,
           "--ngram", str(ngram), "--bands", str(bands), "--rows", str(rows), "--result", result]
    t0 = time.perf_counter()
    with open(log, "w") as f:  # datatrove logs every task at length; keep it out of the report
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"datatrove sidecar failed (exit {proc.returncode}); see {log}")
    with open(result) as f:
        res = json.load(f)
    res["wall_with_startup"], res["log"] = wall, log
    return res


def system_row(name: str, seconds: float, n: int, s: dict, grades) -> str:
    recall = "".join(f"{s['recall'][g]:>{max(8, len(g) + 1)}.3f}" for g in grades)
    return f"{name:<30}{seconds:>8.2f}{n / seconds:>9,.0f}{recall}{s['precision']:>8.3f}{s['false_positives']:>5}"


def compare(texts, truth, grade, langs, per_lang, out, setting) -> dict:
    """One setting: jaxlm at its threshold and at 0, datatrove; prints the rows and returns them."""
    import near_dup_grades as ndg

    ngram, perms, bands, threshold = setting
    rows = perms // bands
    sign, jx = run_jaxlm(texts, ngram, perms, bands, [threshold, 0.0])
    dt = run_datatrove(per_lang, out, ngram, bands, rows)
    kept = {i for la in dt["languages"].values() for i in la["kept"]}
    dt_seconds = sum(sum(la["seconds"].values()) for la in dt["languages"].values())
    scores = {f"jaxlm thr {threshold}": (sign + jx[threshold][0], ndg.score(jx[threshold][1], truth, grade, langs)),
              "jaxlm thr 0 (LSH only)": (sign + jx[0.0][0], ndg.score(jx[0.0][1], truth, grade, langs)),
              f"datatrove {dt['version']}": (dt_seconds, ndg.score(sorted(set(range(len(texts))) - kept), truth, grade, langs))}
    print(f"\nngram={ngram} perms={perms} bands={bands}x{rows} (jaxlm threshold {threshold}); {len(texts)} docs")
    print(f"{'system':<30}{'seconds':>8}{'docs/s':>9}" + "".join(f"{g:>{max(8, len(g) + 1)}}" for g in ndg.GRADES)
          + f"{'prec':>8}{'FP':>5}")
    for name, (sec, s) in scores.items():
        print(system_row(name, sec, len(texts), s, ndg.GRADES))
    for name, (sec, s) in scores.items():
        print(f"  {name} recall by language: " + ", ".join(
            f"{la}: " + " ".join(f"{g}={r:.2f}" for g, r in rec.items()) for la, rec in s["recall_by_language"].items()))
    stage = {st: sum(la["seconds"][st] for la in dt["languages"].values()) for st in ("signature", "buckets", "cluster", "filter")}
    jx_time = scores[f"jaxlm thr {threshold}"][0]
    print(f"  jaxlm: signatures {sign:.2f} s + near_duplicates {jx[threshold][0]:.3f} s; datatrove stages "
          + ", ".join(f"{k} {v:.2f} s" for k, v in stage.items())
          + f" (subprocess wall incl. imports {dt['wall_with_startup']:.1f} s)")
    print(f"  time ratio jaxlm/datatrove: {jx_time / dt_seconds:.2f}")
    return {"setting": {"ngram": ngram, "perms": perms, "bands": bands, "rows": rows, "threshold": threshold},
            "datatrove_stage_seconds": stage, "datatrove_wall_with_startup": dt["wall_with_startup"],
            "jaxlm_sign_seconds": sign, "ratio_jaxlm_over_datatrove": jx_time / dt_seconds,
            "systems": {name: {"seconds": sec, **s} for name, (sec, s) in scores.items()}}


def default_settings(out: str) -> list[tuple]:
    """The recommended setting of OUT/results.json (near_dup_grades.py's run) if there is one, and the old
    defaults."""
    settings = []
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f).get("recommended")
        if rec:
            settings.append((rec["ngram"], rec["perms"], rec["bands"], rec["threshold"]))
    return settings + [(5, 128, 16, 0.8)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/grades")
    parser.add_argument("--quick", action="store_true", help="150 originals per language instead of 600")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", metavar="NGRAM,PERMS,BANDS,THRESHOLD",
                        help="repeatable; default: OUT/results.json's recommended setting and 5,128,16,0.8")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import near_dup_grades as ndg

    if not os.path.exists(DTVENV_PYTHON):
        raise SystemExit(f"{DTVENV_PYTHON} is missing: create the venv as this file's docstring says")
    os.makedirs(args.out, exist_ok=True)
    settings = ([tuple(float(x) if "." in x else int(x) for x in s.split(",")) for s in args.setting]
                if args.setting else default_settings(args.out))
    texts, truth, grade = ndg.graded_corpus(args.seed, 150 if args.quick else 600)
    langs = [ndg.language(t) for t in texts]
    per_lang = write_corpus(args.out, texts, langs)
    print(f"wrote {args.out}/corpus.jsonl: {len(texts)} docs ({langs.count('en')} en, {langs.count('zh')} zh)")
    results = [compare(texts, truth, grade, langs, per_lang, args.out, s) for s in settings]
    with open(os.path.join(args.out, "datatrove_compare.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}/datatrove_compare.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["datatrove"]:
        datatrove_main(sys.argv[2:])
    else:
        main()
