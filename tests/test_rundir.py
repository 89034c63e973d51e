"""The run directory is never damaged by another command: validation first, then one write per segment."""

import json
import os

import pytest

from jaxlm import cli
from jaxlm.core import rundir
from jaxlm.core.config import ConfigError

SMALL = ["tiny", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
         "model.mlp_dim=64", "model.vocab_size=384", "model.max_seq_len=32", "train.seq_len=32",
         "train.batch_size=8", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
         "optim.warmup_steps=1", "train.progress=False"]


def test_config_changes_allowed_on_resume_and_refused_otherwise(tmp_path):
    rd = rundir.RunDir(str(tmp_path))
    saved = {"model": {"num_layers": 4, "attention": "xla"}, "train": {"steps": 10, "seed": 0}, "optim": {"lr": 1e-3}}
    rd.begin_segment(saved, 0)
    assert rd.check_resume(saved, has_checkpoint=True) == {}
    more = {**saved, "train": {"steps": 20, "seed": 0}, "model": {"num_layers": 4, "attention": "cudnn"}}
    assert rd.check_resume(more, has_checkpoint=True) == {"model.attention": ("xla", "cudnn"), "train.steps": (10, 20)}
    other = {**saved, "model": {"num_layers": 3, "attention": "xla"}, "optim": {"lr": 2e-3}}
    with pytest.raises(ConfigError, match=r"model.num_layers: 4 -> 3, optim.lr: 0.001 -> 0.002") as e:
        rd.check_resume(other, has_checkpoint=True)
    assert "\n" not in str(e.value)
    # Without a checkpoint there is no state to protect: a new config replaces the old one.
    assert rd.check_resume(other, has_checkpoint=False) == {}

    # A config.json cut short (an interrupted copy) does not wave a different config through: the newest
    # segment's config stands in for it.
    rd.begin_segment(more, 5)
    (tmp_path / rundir.CONFIG).write_text('{"model": {"num_la')
    (tmp_path / rundir.SEGMENTS / "10.json").write_text("{")  # a damaged later segment is skipped too
    assert rd.saved_config() == more
    with pytest.raises(ConfigError, match="model.num_layers: 4 -> 3"):
        rd.check_resume(other, has_checkpoint=True)


def test_a_failing_command_leaves_a_finished_run_intact_and_resuming_records_segments(tmp_path, capsys):
    run = tmp_path / "run"
    base = SMALL + [f"train.run_dir={run}", f"data.cache_dir={tmp_path}/cache"]
    assert cli.main(["train", *base, "train.steps=2"]) == 0
    config = (run / "config.json").read_bytes()
    capsys.readouterr()
    # Bad data, then a different model: both refused with one line, and nothing in the run is rewritten.
    assert cli.main(["train", *base, "data.source=/typo/*.txt", "train.steps=2"]) == 2
    assert cli.main(["train", *base, "train.seed=5", "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "(data.source: " in err[0] and "(train.seed: 0 -> 5)" in err[1], err
    assert (run / "config.json").read_bytes() == config
    assert cli.main(["eval", str(run), "--limit", "2"]) == 0
    # More steps is a change resuming allows: it is reported, and each segment's config is kept.
    assert cli.main(["train", *base, "train.steps=4"]) == 0
    assert "train.steps 2 -> 4" in capsys.readouterr().out
    segments = sorted(os.listdir(run / "configs"))
    assert segments == ["0.json", "2.json"]
    assert [json.loads((run / "configs" / s).read_text())["train"]["steps"] for s in segments] == [2, 4]


def test_new_directory_appears_whole_or_not_at_all(tmp_path):
    from jaxlm.core import atomic

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic.new_directory(str(out)) as tmp:
            (tmp_path / "out.tmp.x").mkdir()  # a stranger's temporary directory is left alone
            open(os.path.join(tmp, "half.bin"), "w").close()
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["out.tmp.x"]  # no `out`, no temporary left behind
    out.mkdir()  # an empty directory may be filled
    with atomic.new_directory(str(out)) as tmp:
        open(os.path.join(tmp, "whole.bin"), "w").close()
    assert os.listdir(out) == ["whole.bin"]
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        with atomic.new_directory(str(out)):
            pass
    assert os.listdir(out) == ["whole.bin"]
