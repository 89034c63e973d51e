"""`jaxlm data from-seqio` throughput: a real seqio Task (the full King James Bible, one chapter per line,
TextLineDataSource -> tokenize -> append_eos with a SentencePieceVocabulary) exported to prepared shards.

    .venv/bin/python bench/seqio_export.py        # needs pip install -e '.[seqio]'

Prints the seqio/TensorFlow import time (paid once per process that uses a seqio source), the time seqio
alone takes to yield the task (tf.data + tf_text tokenization; first and second pass), the export's
time (the same iteration plus ArrayRecord writing), and the re-run time of an unchanged task (the cache check).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxlm.data import corpus, seqio_source, tokenizer  # noqa: E402

MODULE = """\
import seqio

VOCAB = seqio.SentencePieceVocabulary({model!r})
seqio.TaskRegistry.add(
    "bench_bible",
    source=seqio.TextLineDataSource({{"train": {path!r}}}),
    preprocessors=[lambda ds: ds.map(lambda line: {{"targets": line}}), seqio.preprocessors.tokenize,
                   seqio.preprocessors.append_eos],
    output_features={{"targets": seqio.Feature(VOCAB, add_eos=True)}},
)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        chapters = [c.replace("\n", " ") for c in corpus.bible_chapters()]
        path = os.path.join(root, "bible.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(chapters) + "\n")
        text_mb = os.path.getsize(path) / 1e6
        model = os.path.join(root, "bible.model")
        tokenizer.train(chapters, 8192, "bpe", model)
        with open(os.path.join(root, "bench_seqio_tasks.py"), "w") as f:
            f.write(MODULE.format(model=model, path=path))
        sys.path.insert(0, root)

        t = time.perf_counter()
        seqio = seqio_source._seqio()
        importlib.import_module("bench_seqio_tasks")
        imported = time.perf_counter() - t
        task = seqio.get_mixture_or_task("bench_bible")

        seqio_only = []
        for _ in range(2):  # the first pass also builds the tf.data graph and the tokenizer
            t = time.perf_counter()
            ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, seed=0)
            tokens = sum(len(ex["targets"]) for ex in ds.as_numpy_iterator())
            seqio_only.append(time.perf_counter() - t)
        first, seqio_only = seqio_only

        out = os.path.join(root, "out")
        t = time.perf_counter()
        result = seqio_source.export("bench_bible", out, progress=False)
        export = time.perf_counter() - t
        t = time.perf_counter()
        seqio_source.export("bench_bible", out, progress=False)
        rerun = time.perf_counter() - t
        assert result.tokens == tokens

    print(f"task: {len(chapters):,} documents, {tokens:,} tokens, {text_mb:.1f} MB of text")
    print(f"{'import seqio + TensorFlow + task module:':<42}{imported:6.2f} s (once per process)")
    print(f"{'seqio alone yields the task, first pass:':<42}{first:6.2f} s")
    for what, s in (("seqio alone yields the task, again:", seqio_only),
                    ("export (same + ArrayRecord shards):", export)):
        print(f"{what:<42}{s:6.2f} s  {len(chapters) / s:8,.0f} docs/s {tokens / s:10,.0f} tokens/s "
              f"{text_mb / s:6.2f} MB/s")
    print(f"{'re-run, task unchanged (cache check):':<42}{rerun:6.2f} s")


if __name__ == "__main__":
    main()
