"""Reward functions named by module path: summed per completion; a group whose function raises, returns a
non-number or NaN, or hangs past the timeout is dropped and counted, and too many failed groups stop it."""

import time

import numpy as np
import pytest

from jaxlm.core.config import ConfigError
from jaxlm.training import reward_functions as rf


def test_rewards_are_summed_per_completion():
    with rf.Scorer(("rewards_for_tests:length", "rewards_for_tests:says_amen"), timeout=30, max_failed_fraction=0.5) as s:
        out = s.score([{"prompt": "a"}, {"prompt": "b"}], [["one two", "so be it. Amen."], ["x", "Amen."]])
    np.testing.assert_array_equal(out.rewards, [[2.0, 5.0], [1.0, 2.0]])
    assert out.ok.all() and not out.failures


def test_failing_groups_are_dropped_and_counted_then_stop_the_run():
    prompts = [{"kind": k} for k in ("ok", "raise", "ok", "string", "nan", "ok", "hang", "ok")]
    with rf.Scorer(("rewards_for_tests:picky",), timeout=2.0, max_failed_fraction=0.6) as s:
        t = time.perf_counter()
        out = s.score(prompts, [["a", "b"]] * len(prompts))
        assert time.perf_counter() - t < 30  # the hung call was stopped at its timeout
        assert out.ok.tolist() == [True, False, True, False, False, True, False, True]
        assert dict(out.failures) == {"raised KeyError": 1, "not a number": 1, "not finite": 1, "timed out": 1}
        np.testing.assert_array_equal(out.rewards[out.ok], 1.0)
        # The worker came back after the timeout; another batch that is all failures crosses 60% overall.
        with pytest.raises(rf.RewardError, match=r"8 of 12 prompt groups failed to score \(.*\), over the limit of 60%"):
            s.score([{"kind": "raise"}] * 4, [["a"]] * 4)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "is not MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("rewards_for_tests:missing", "has no function missing"),
])
def test_bad_names_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        rf.Scorer((spec,), timeout=1, max_failed_fraction=0.1)
