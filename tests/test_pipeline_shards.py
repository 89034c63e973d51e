"""Training from prepared shards: packing, the weighted mixture, exact resume, process sharding, the
tokenizer check, and `jaxlm tokenizer train` -> `jaxlm data prepare` -> `jaxlm train` end to end."""

import json
import os

import numpy as np
import pytest
from conftest import replace, small_config

from jaxlm import cli
from jaxlm.core.config import ConfigError, PrepareConfig
from jaxlm.data import corpus, pipeline
from jaxlm.data.packing import ConcatSplitRows, DocStore, FirstFitRows, first_fit
from jaxlm.data.prepare import run as prepare
from jaxlm.model.attention import make_mask


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, 1000, size=n).astype(np.int32) for n in lengths]
    return DocStore(docs, np.arange(len(docs)), np.asarray(lengths))


def _check_rows(rows, seq_len, limit=200):
    batch = [rows[r] for r in range(min(len(rows), limit))]
    seg, pos, mask = (np.stack([b[k] for b in batch]) for k in ("segment_ids", "positions", "loss_mask"))
    for b in batch:
        np.testing.assert_array_equal(b["inputs"][1:], b["targets"][:-1])
    # Positions count up inside a segment and restart at each new one.
    starts = np.concatenate([np.ones((len(batch), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(pos[starts] == 0) and np.all(np.diff(pos, axis=1)[~starts[:, 1:]] == 1)
    # No attention crosses a segment: the model's mask only links equal segment ids.
    m = np.asarray(make_mask(seg, 0))[:, 0]
    assert not np.any(m & (seg[:, :, None] != seg[:, None, :]))
    # A target is trained on only when it continues the same piece (never padding, never the next doc).
    assert np.all(mask[seg == 0] == 0)
    assert np.all(mask[:, :-1][seg[:, :-1] != seg[:, 1:]] == 0)


@pytest.mark.parametrize("lengths", [[5, 3, 40, 7, 20, 1, 16, 17], list(np.random.default_rng(1).integers(1, 70, 200))])
def test_first_fit_loses_and_duplicates_no_token(lengths):
    store = _docs(lengths)
    rows = FirstFitRows(store, 16)
    _check_rows(rows, 16)
    seen = np.concatenate([rows[r]["inputs"][rows[r]["segment_ids"] > 0] for r in range(len(rows))])
    expected = np.concatenate([store[i] for i in range(len(store))])
    assert sorted(seen.tolist()) == sorted(expected.tolist())
    assert len(rows) <= int(np.ceil(sum(lengths) / 16 * 1.1)) + 1  # tightly packed


def test_concat_split_covers_the_stream_once():
    store = _docs([50, 31, 77, 40, 9, 100])
    rows = ConcatSplitRows(store, 16)
    _check_rows(rows, 16)
    stream = np.concatenate([store[i] for i in range(len(store))])
    seen = np.concatenate([rows[r]["inputs"] for r in range(len(rows))])
    np.testing.assert_array_equal(seen, stream[: len(rows) * 16])
    assert len(stream) - len(seen) <= 16  # only the last partial row is left out


def test_first_fit_is_first_fit():
    # Decreasing order 9, 6, 5, 4, 3, 2, 1 into bins of 10: [9,1], [6,4], [5,3,2].
    bins = first_fit(np.array([5, 9, 2, 6, 1, 4, 3]), 10)
    assert bins.tolist() == [2, 0, 2, 1, 0, 1, 2]


def _mixture(parts=(300, 200), weights=(0.75, 0.25)):
    rows = [FirstFitRows(_docs([30] * n, seed=i), 8) for i, n in enumerate(parts)]
    return pipeline.Mixture(rows, list(weights)), rows


def _key(row):
    return tuple(row.tolist())


def test_mixture_proportions_determinism_and_exact_resume():
    mix, parts = _mixture()
    origin = {_key(parts[i][r]["inputs"]): i for i in range(2) for r in range(len(parts[i]))}
    it = pipeline.BatchIterator(mix, 8, seed=3)
    batches = [next(it)["inputs"] for _ in range(40)]
    share = np.mean([origin[_key(r)] == 0 for b in batches for r in b])
    assert abs(share - 0.75) < 0.05
    state = it.get_state()
    rest = [next(it)["inputs"] for _ in range(10)]
    again = pipeline.BatchIterator(mix, 8, seed=3)
    assert all(np.array_equal(b, next(again)["inputs"]) for b in batches + rest)
    resumed = pipeline.BatchIterator(mix, 8, seed=3, saved=json.loads(json.dumps(state)))
    assert all(np.array_equal(b, next(resumed)["inputs"]) for b in rest)
    by_step = pipeline.BatchIterator(mix, 8, seed=3, start=40)
    assert all(np.array_equal(b, next(by_step)["inputs"]) for b in rest)


def test_mixture_order_survives_a_process_count_change():
    mix, _ = _mixture()
    single = pipeline.BatchIterator(mix, 8, seed=1, process=(0, 1))
    whole = [{_key(r) for r in next(single)["inputs"]} for _ in range(6)]
    for count in (2, 4):
        shards = [pipeline.BatchIterator(mix, 8, seed=1, process=(p, count), start=3) for p in range(count)]
        for step in range(3, 6):
            assert {_key(r) for s in shards for r in next(s)["inputs"]} == whole[step], (count, step)


def test_changed_data_ignores_the_saved_position(caplog):
    mix, _ = _mixture()
    it = pipeline.BatchIterator(mix, 8, seed=1)
    for _ in range(3):
        next(it)
    other, _ = _mixture(weights=(0.5, 0.5))
    resumed = pipeline.BatchIterator(other, 8, seed=1, start=3, saved=it.get_state())
    expected = pipeline.BatchIterator(other, 8, seed=1, start=3)
    assert np.array_equal(next(resumed)["inputs"], next(expected)["inputs"])
    assert "the data changed since the checkpoint" in caplog.text


# ---- real shards ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    """A tokenizer trained with `jaxlm tokenizer train` on English and Chinese, then two prepared sets."""
    root = tmp_path_factory.mktemp("shards")
    bible, chinese = corpus.documents("bible")[:80], corpus.peoples_daily()[:40]
    for name, docs in (("en", bible), ("zh", chinese)):
        os.makedirs(root / "raw", exist_ok=True)
        with open(root / "raw" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs)
    tok = str(root / "tok.model")
    assert cli.main(["tokenizer", "train", str(root / "raw" / "*.jsonl"), "--out", tok, "--vocab-size", "3000",
                     "--text-field", "body"]) == 0
    outs = []
    for name in ("en", "zh"):
        c = PrepareConfig(text_field="body", tokenizer=tok, docs_per_shard=25, workers=1)
        prepare.prepare([str(root / "raw" / f"{name}.jsonl")], str(root / name), c, progress=False)
        outs.append(str(root / name))
    return outs, tok


def test_prepared_mixture_feeds_rows(prepared_pair):
    outs, tok = prepared_pair
    config = replace(small_config(vocab_size=3072), data=dict(prepared=tuple(outs), weights=(2.0, 1.0),
                                                              packing="first_fit"))
    data = pipeline.prepare(config)
    assert isinstance(data.train, pipeline.Mixture) and data.vocab_size == 3000 and data.eval is not None
    for part in data.train.sources:
        _check_rows(part, config.train.seq_len)
    batch = next(pipeline.BatchIterator(data.train, 8, seed=0))
    assert batch["inputs"].shape == (8, 16) and batch["loss_mask"].sum() > 0


def test_tokenizer_mismatch_is_one_clear_error(prepared_pair, tmp_path):
    outs, tok = prepared_pair
    other = tmp_path / "other.model"
    other.write_bytes(open(tok, "rb").read() + b"\0")
    config = replace(small_config(vocab_size=3072), data=dict(prepared=tuple(outs), tokenizer=str(other)))
    with pytest.raises(ConfigError, match="was tokenized with .* but the training tokenizer"):
        pipeline.prepare(config)
    config = replace(small_config(vocab_size=3072), data=dict(prepared=tuple(outs), weights=(1.0,)))
    with pytest.raises(ConfigError, match="one weight per folder"):
        pipeline.prepare(config)
    config = replace(small_config(vocab_size=3072), data=dict(prepared=(str(tmp_path),)))
    with pytest.raises(ConfigError, match="has no manifest.json"):
        pipeline.prepare(config)
    config = replace(small_config(vocab_size=1000), data=dict(prepared=tuple(outs)))
    with pytest.raises(ConfigError, match="set model.vocab_size=3000"):
        pipeline.prepare(config)


def _train_args(outs, tok, steps):
    return ["tiny", "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
            "model.mlp_dim=128", "model.vocab_size=3072", "model.max_seq_len=64", "train.seq_len=64",
            "train.batch_size=8", "train.log_every=1", "train.eval_every=100", "train.eval_batches=1",
            "optim.warmup_steps=2", "train.progress=False", f"train.steps={steps}", "checkpoint.every=100",
            f"data.prepared={tuple(outs)!r}", "data.weights=(3.0, 1.0)", "data.packing=first_fit"]


@pytest.mark.slow
def test_train_on_prepared_mixture_and_resume_exactly(prepared_pair, tmp_path):
    """End to end: `jaxlm train` on the shards of two prepared sets, mixed 3:1 and first-fit packed, then
    the same run stopped halfway and resumed gives the same losses."""
    from test_train import jaxlm_train, losses

    outs, tok = prepared_pair
    whole = jaxlm_train(_train_args(outs, tok, 6), tmp_path / "whole", str(tmp_path / "cache"))
    assert whole.returncode == 0, whole.stderr
    loss = losses(tmp_path / "whole")
    assert sorted(loss) == list(range(1, 7)) and all(np.isfinite(v) for v in loss.values()) and loss[6] < loss[1]
    first = jaxlm_train(_train_args(outs, tok, 6) + ["train.stop_at=3"], tmp_path / "split", str(tmp_path / "c"))
    assert first.returncode == 0, first.stderr
    # Resumed on 4 devices instead of 8 and with 2 prefetching worker processes: the data position is
    # still exact.
    second = jaxlm_train(_train_args(outs, tok, 6) + ["data.workers=2"], tmp_path / "split", str(tmp_path / "c"),
                         devices=4)
    assert second.returncode == 0, second.stderr
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
