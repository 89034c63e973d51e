"""The objectives' rows, made inside the grain pipeline: span corruption (encoder-decoder and prefix-LM),
prefix-LM and masked LM. Inputs plus targets give back the source tokens, lengths fit, draws follow the
seed and the stream position (so a resume repeats them), and a tokenizer without sentinels is one line."""

import dataclasses

import numpy as np
import pytest

from jaxlm.core.config import Config, ConfigError, ModelConfig, ObjectiveConfig, TrainConfig
from jaxlm.data import denoise, objective_rows
from jaxlm.data.pipeline import BatchIterator, PackedRows, TokenStream

VOCAB = 500


class FakeTokenizer:
    """Ids 0-3 pad/unk/bos/eos, then words, then `extra` sentinels at the end (<extra_id_0> last)."""

    def __init__(self, extra=100, vocab=VOCAB):
        self.extra, self.vocab = extra, vocab

    def vocab_size(self):
        return self.vocab

    def id_to_piece(self, i):
        return f"<extra_id_{self.vocab - 1 - i}>" if i >= self.vocab - self.extra else f"w{i}"

    pad_id, unk_id, bos_id, eos_id = (lambda self: 0), (lambda self: 1), (lambda self: 2), (lambda self: 3)


def _config(arch="t5", kind="span_corruption", seq_len=64, **objective):
    model = ModelConfig(architecture=arch, vocab_size=VOCAB, max_seq_len=256)
    return Config(model=model, train=TrainConfig(seq_len=seq_len, batch_size=4),
                  objective=ObjectiveConfig(kind=kind, **objective))


def _rows(fmt, docs=40, doc_len=37, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB - 100, size=docs * doc_len).astype(np.int32)
    return PackedRows(TokenStream(tokens, np.repeat(np.arange(docs), doc_len).astype(np.int32)), fmt.source_length)


def test_t5_lengths_follow_t5s_helper():
    """T5's own numbers: 512 input tokens take 568 raw ones and make 114 targets."""
    fmt = objective_rows.row_format(_config(seq_len=512), FakeTokenizer())
    assert (fmt.source_length, fmt.target_len) == (568, 114)


@pytest.mark.parametrize("arch, prefix_lm", [("t5", False), ("llama", True)])
def test_span_corruption_rows_give_back_the_source(arch, prefix_lm):
    config = _config(arch, prefix_lm=prefix_lm, noise_density=0.25, mean_span_length=2.5)
    fmt = objective_rows.row_format(config, FakeTokenizer())
    rows, make = _rows(fmt), objective_rows.transform(fmt)
    for r in range(len(rows)):
        source = rows[r]["inputs"]
        row = make(rows[r], np.random.default_rng(r))
        if arch == "t5":
            inputs, targets = row["inputs"][row["segment_ids"] > 0], row["targets"][row["loss_mask"] > 0]
            assert len(row["inputs"]) == fmt.seq_len and len(row["targets"]) == fmt.target_len
            np.testing.assert_array_equal(row["decoder_inputs"][1:], row["targets"][:-1])
            assert row["decoder_inputs"][0] == 0 and inputs[-1] == 3 and targets[-1] == 3
            inputs, targets = inputs[:-1], targets[:-1]
        else:
            n_in = int(row["prefix_mask"].sum())
            sequence = np.concatenate([row["inputs"][:1], row["targets"]])[: int(row["segment_ids"].sum()) + 1]
            inputs, targets = sequence[: n_in - 1], sequence[n_in:-1]
            # The loss covers exactly the targets: the prediction at the last input token onwards.
            assert np.flatnonzero(row["loss_mask"]).tolist() == list(range(n_in - 1, len(sequence) - 1))
        np.testing.assert_array_equal(denoise.uncorrupt(inputs, targets, fmt.sentinels), source)


def test_draws_follow_the_seed_and_position_and_resume_exactly():
    fmt = objective_rows.row_format(_config(), FakeTokenizer())
    rows, make = _rows(fmt), objective_rows.transform(fmt)
    a = BatchIterator(rows, 4, seed=5, transform=make)
    batches = [next(a) for _ in range(6)]
    resumed = BatchIterator(rows, 4, seed=5, start=3, transform=make)
    for want in batches[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    other = next(BatchIterator(rows, 4, seed=6, transform=make))
    assert not np.array_equal(other["inputs"], batches[0]["inputs"])
    # Every epoch draws new noise for the same source row.
    one = BatchIterator(rows, 1, seed=5, transform=make)
    epoch = [next(one) for _ in range(2 * len(rows))]
    firsts = {tuple(b["inputs"][0]) for b in epoch}
    assert len(firsts) > len(rows)


def test_prefix_lm_rows():
    fmt = objective_rows.row_format(_config("llama", "prefix_lm", seq_len=32), FakeTokenizer(0))
    rows, make = _rows(fmt, doc_len=50), objective_rows.transform(fmt)
    splits = []
    for r in range(len(rows)):
        row = make(rows[r], np.random.default_rng(r))
        split = int(row["prefix_mask"].sum())
        assert row["prefix_mask"][:split].all() and split >= 1
        assert np.array_equal(row["inputs"], rows[r]["inputs"])
        assert not row["loss_mask"][: split - 1].any()
        np.testing.assert_array_equal(row["loss_mask"][split - 1:], rows[r]["loss_mask"][split - 1:])
        splits.append(split)
    assert len(set(splits)) > 3


def test_mlm_rows_mask_the_rate_and_keep_targets():
    tok = FakeTokenizer(extra=1)
    config = dataclasses.replace(_config("bert", "mlm", seq_len=64), model=ModelConfig(
        architecture="bert", vocab_size=VOCAB, max_seq_len=256, type_vocab_size=2))
    fmt = objective_rows.row_format(config, tok)
    assert fmt.mask_id == VOCAB - 1
    rows, make = _rows(fmt), objective_rows.transform(fmt)
    chosen = masked = 0
    for r in range(len(rows)):
        row = make(rows[r], np.random.default_rng(r))
        np.testing.assert_array_equal(row["targets"], rows[r]["inputs"])
        picked = row["loss_mask"] > 0
        chosen += picked.sum()
        masked += (row["inputs"][picked] == fmt.mask_id).sum()
        assert np.array_equal(row["inputs"][~picked], rows[r]["inputs"][~picked])
    assert abs(chosen / (len(rows) * 64) - 0.15) < 0.01 and abs(masked / chosen - 0.8) < 0.05


def test_a_tokenizer_without_sentinels_is_one_line():
    with pytest.raises(ConfigError, match="--extra-ids 100"):
        objective_rows.row_format(_config(), FakeTokenizer(extra=10))
    with pytest.raises(ConfigError, match="no mask piece"):
        config = dataclasses.replace(_config("bert", "mlm"), model=ModelConfig(architecture="bert", vocab_size=VOCAB))
        objective_rows.row_format(config, FakeTokenizer(extra=0))


@pytest.mark.parametrize("arch, prefix_lm", [("t5", False), ("llama", True)])
def test_ul2_draws_every_denoiser_and_each_row_gives_back_its_source(arch, prefix_lm):
    config = _config(arch, "ul2", seq_len=128, prefix_lm=prefix_lm)
    fmt = objective_rows.row_format(config, FakeTokenizer())
    for d in objective_rows.UL2:  # every denoiser fits the rows
        inputs, targets = objective_rows.denoised_lengths(fmt.source_length, d)
        assert (inputs <= fmt.seq_len and targets <= fmt.target_len) if arch == "t5" else inputs + targets <= 129
    rows, make = _rows(fmt, docs=200), objective_rows.transform(fmt)
    sequential, densities = 0, set()
    for r in range(len(rows)):
        source = rows[r]["inputs"]
        row = make(rows[r], np.random.default_rng(r))
        if arch == "t5":
            inputs, targets = row["inputs"][row["segment_ids"] > 0][:-1], row["targets"][row["loss_mask"] > 0][:-1]
        else:
            n_in = int(row["prefix_mask"].sum())
            sequence = np.concatenate([row["inputs"][:1], row["targets"]])[: int(row["segment_ids"].sum()) + 1]
            inputs, targets = sequence[: n_in - 1], sequence[n_in:-1]
        if not np.isin(targets, fmt.sentinels).any():  # the S-denoiser: the row's last quarter
            sequential += 1
            np.testing.assert_array_equal(np.concatenate([inputs, targets]), source)
            assert len(targets) == objective_rows.sequential_split(len(source))
        else:
            np.testing.assert_array_equal(denoise.uncorrupt(inputs, targets, fmt.sentinels), source)
            densities.add(round((len(targets) - np.isin(targets, fmt.sentinels).sum()) / len(source), 1))
    assert 0.05 < sequential / len(rows) < 0.3 and densities == {0.1, 0.5}  # 15% rounds to 0.1 here
