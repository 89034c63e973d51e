"""The input pipeline: packing, masks, determinism, resume and process sharding."""

import numpy as np
import pytest

from jaxlm.data import corpus
from jaxlm.data.pipeline import BatchIterator, PackedRows, TokenStream


def _stream(doc_lengths, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([rng.integers(4, 100, size=n) for n in doc_lengths]).astype(np.int32)
    doc_ids = np.repeat(np.arange(len(doc_lengths)), doc_lengths).astype(np.int32)
    return TokenStream(tokens, doc_ids)


def test_packed_rows_positions_segments_and_mask():
    stream = _stream([5, 3, 12, 7, 20])
    rows = PackedRows(stream, seq_len=8)
    for r in range(len(rows)):
        row = rows[r]
        docs = stream.doc_ids[r * 8 : r * 8 + 9]
        np.testing.assert_array_equal(row["inputs"], stream.tokens[r * 8 : r * 8 + 8])
        np.testing.assert_array_equal(row["targets"], stream.tokens[r * 8 + 1 : r * 8 + 9])
        for i in range(8):
            # Positions restart at each document (and at the row start for a continuing document).
            same_before = [j for j in range(i + 1) if docs[j] == docs[i]]
            assert row["positions"][i] == i - same_before[0]
            # A target from the next document is never trained on.
            assert row["loss_mask"][i] == int(docs[i + 1] == docs[i])
        # Segment ids change exactly where documents change.
        np.testing.assert_array_equal(np.diff(row["segment_ids"]) != 0, np.diff(docs[:-1]) != 0)


def test_every_token_is_seen_once_per_epoch():
    stream = _stream([50, 31, 77, 40, 9, 100])
    rows = PackedRows(stream, seq_len=16)
    it = BatchIterator(rows, global_batch=1, seed=3)
    seen = np.concatenate([next(it)["inputs"].reshape(-1) for _ in range(len(rows))])
    expected = stream.tokens[: len(rows) * 16]
    assert sorted(seen.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # worker processes: ~12 s
def test_iterator_is_deterministic_and_resumes_exactly(workers):
    rows = PackedRows(_stream([30] * 40), seq_len=8)
    a = BatchIterator(rows, 4, seed=7, workers=workers)
    first = [next(a)["inputs"] for _ in range(5)]
    state = a.get_state()
    rest = [next(a)["inputs"] for _ in range(5)]
    plain = BatchIterator(rows, 4, seed=7)  # worker processes change nothing in the data
    assert all(np.array_equal(x, next(plain)["inputs"]) for x in first + rest)
    resumed = BatchIterator(rows, 4, seed=7, workers=workers, saved=state)
    assert all(np.array_equal(x, next(resumed)["inputs"]) for x in rest)
    by_step = BatchIterator(rows, 4, seed=7, workers=1 - min(workers, 1), start=5, saved=state)  # other layout
    assert all(np.array_equal(x, next(by_step)["inputs"]) for x in rest)
    other_seed = BatchIterator(rows, 4, seed=8)
    assert not all(np.array_equal(x, next(other_seed)["inputs"]) for x in first)


@pytest.mark.parametrize("count", [2, 4])
def test_global_batch_does_not_depend_on_process_count(count):
    """Step s consumes the same rows whether one process or `count` processes read them."""
    rows = PackedRows(_stream([25] * 60), seq_len=8)
    single = BatchIterator(rows, 8, seed=1, process=(0, 1))
    shards = [BatchIterator(rows, 8, seed=1, process=(p, count)) for p in range(count)]
    for step in range(6):
        whole = {tuple(r) for r in next(single)["inputs"]}
        parts = {tuple(r) for s in shards for r in next(s)["inputs"]}
        assert whole == parts, step
    # Resuming with a different process count: every process starts at the step.
    resumed = [BatchIterator(rows, 8, seed=1, process=(p, 2), start=6) for p in range(2)]
    assert {tuple(r) for it in resumed for r in next(it)["inputs"]} == {tuple(r) for r in next(single)["inputs"]}


def test_bible_corpus_split_is_by_document():
    docs = corpus.documents("bible")
    assert len(docs) == 1189 and docs[0].startswith("Genesis 1\nIn the beginning God created")
    train, held_out = corpus.split(docs, 0.01)
    assert len(held_out) == 12 and not set(train) & set(held_out)


def test_text_source_errors_are_clear(tmp_path):
    from jaxlm.core.config import ConfigError

    with pytest.raises(ConfigError, match="matches no files"):
        corpus.documents(str(tmp_path / "*.txt"))
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert corpus.documents(str(tmp_path / "*.txt")) == ["first doc", "second doc"]
