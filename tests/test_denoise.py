"""T5 span corruption: inputs and targets give back the original exactly, the noise fraction and the mean
span length match their settings over many draws, a row's spans follow from (seed, row) alone, and a
vocabulary without enough sentinels is one line."""

import numpy as np
import pytest

from jaxlm.core.config import ConfigError
from jaxlm.data import denoise

VOCAB = 1000
SENTINELS = denoise.t5_sentinels(VOCAB, 100)


def test_sentinels_are_the_vocabularys_last_ids_in_t5s_order():
    assert denoise.t5_sentinels(32100, 3) == [32099, 32098, 32097]  # <extra_id_0> is T5's last id


def test_a_hand_made_mask():
    tokens = np.arange(10, 20)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], bool)
    inputs, targets = denoise.corrupt(tokens, mask, SENTINELS)
    assert inputs.tolist() == [10, 11, 999, 14, 15, 16, 998, 18, 19]
    assert targets.tolist() == [999, 12, 13, 998, 17]


@pytest.mark.parametrize("length, density, span", [(512, 0.15, 3.0), (114, 0.5, 8.0), (37, 0.25, 2.0)])
def test_the_original_comes_back_and_the_statistics_match(length, density, span):
    rng = np.random.default_rng(0)
    noise, spans, drawn = 0, 0, []
    for index in range(300):
        tokens = rng.integers(0, VOCAB - 100, size=length)
        inputs, targets = denoise.span_corruption(tokens, index, seed=7, sentinels=SENTINELS, noise_density=density,
                                                  mean_span_length=span)
        np.testing.assert_array_equal(denoise.uncorrupt(inputs, targets, SENTINELS), tokens)
        hidden = len(targets) - np.isin(targets, SENTINELS).sum()
        noise, spans = noise + hidden, spans + np.isin(inputs, SENTINELS).sum()
        assert len(inputs) + hidden - np.isin(inputs, SENTINELS).sum() == length
        drawn.append(hidden)
    want_noise, want_spans = denoise.span_counts(length, density, span)
    assert set(drawn) == {want_noise}  # T5 fixes the count per length; only where the spans fall is random
    assert abs(noise / (300 * length) - density) < 0.5 / length + 1e-9
    assert abs(noise / spans - want_noise / want_spans) < 1e-9 and abs(noise / spans - span) < span * 0.25


def test_spans_follow_from_the_seed_and_row_alone():
    tokens = np.arange(200)
    a = denoise.span_corruption(tokens, 5, seed=1, sentinels=SENTINELS)
    b = denoise.span_corruption(tokens, 5, seed=1, sentinels=SENTINELS)  # as after a resume
    c = denoise.span_corruption(tokens, 6, seed=1, sentinels=SENTINELS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])


def test_span_lengths_vary_and_average_the_setting():
    rng, lengths = np.random.default_rng(3), []
    for _ in range(2000):
        mask = denoise.noise_mask(100, 0.15, 3.0, rng)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lengths += (edges[1::2] - edges[::2]).tolist()
    assert abs(np.mean(lengths) - 3.0) < 0.05 and max(lengths) > 3 and min(lengths) == 1


def test_too_few_sentinels_is_one_line():
    with pytest.raises(ConfigError, match="needs 26 sentinel ids for a row but the vocabulary has 10"):
        denoise.span_corruption(np.arange(512), 0, seed=0, sentinels=SENTINELS[:10])


def test_mlm_masks_fifteen_percent_eighty_ten_ten_and_never_special_tokens():
    special = [0, 1, 2, 3]  # pad, [CLS], [SEP], [MASK]
    mask_id, rng = 3, np.random.default_rng(0)
    chosen = masked = randomised = kept = 0
    for index in range(400):
        tokens = rng.integers(4, 500, size=128)
        tokens[0], tokens[-1] = 1, 2
        inputs, loss = denoise.mlm_mask(tokens, index, seed=5, mask_id=mask_id, vocab_size=500, special=special)
        assert loss.sum() == round(0.15 * 126) and not loss[0] and not loss[-1]  # [CLS] and [SEP] never chosen
        assert np.array_equal(inputs[loss == 0], tokens[loss == 0])  # only chosen tokens change
        picked, was = inputs[loss == 1], tokens[loss == 1]
        chosen, masked = chosen + len(picked), masked + np.sum(picked == mask_id)
        kept += np.sum(picked == was)
        randomised += np.sum((picked != mask_id) & (picked != was))
        assert not np.isin(picked[picked != mask_id], special).any()
    # 80/10/10, within a few standard errors over ~7,600 chosen tokens (a random token equals the original 1/496)
    assert abs(masked / chosen - 0.8) < 0.02 and abs(randomised / chosen - 0.1) < 0.015 and abs(kept / chosen - 0.1) < 0.015
    again = denoise.mlm_mask(tokens, index, seed=5, mask_id=mask_id, vocab_size=500, special=special)
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], loss)  # the same after a resume
