"""seqio interop (jaxlm[seqio]): real seqio Tasks and a Mixture over King James Bible chapters, exported to
prepared shards and trained on.

The reference for the exported tokens is seqio itself: what `Task.get_dataset` yields, and, independently
of tf.data, the vocabulary's own Python encoder applied to each line of the source file plus EOS.
"""

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import replace, small_config

from jaxlm import cli
from jaxlm.core.config import ConfigError
from jaxlm.data import corpus, pipeline, prepared, tokenizer as tokenizer_lib

pytestmark = pytest.mark.skipif(importlib.util.find_spec("seqio") is None,
                                reason="seqio is not installed; pip install -e '.[seqio]' runs these tests")

MODULE = "jaxlm_test_seqio_tasks"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, once the module imports it

# The task registry a T5X user would have: a module that registers Tasks and a Mixture when imported.
TASKS_MODULE = '''\
"""seqio tasks over King James Bible chapters, one chapter per line (written by tests/test_seqio.py)."""
import seqio

VOCAB = seqio.SentencePieceVocabulary({model!r})


def lines_to_targets(ds):
    return ds.map(lambda line: {{"targets": line}})


def add(name, path, vocab=VOCAB):
    seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({{"train": path, "validation": path}}),
        preprocessors=[lines_to_targets, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={{"targets": seqio.Feature(vocab, add_eos=True)}},
    )


def halves(ds):
    import tensorflow as tf

    return ds.map(lambda line: {{"inputs": tf.strings.substr(line, 0, 40), "targets": tf.strings.substr(line, 40, 60)}})


add("bible_early", {early!r})
seqio.TaskRegistry.add(
    "bible_pairs",
    source=seqio.TextLineDataSource({{"train": {early!r}}}),
    preprocessors=[halves, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={{"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)}},
)
add("bible_late", {late!r})
add("bible_bytes", {late!r}, vocab=seqio.ByteVocabulary())
seqio.MixtureRegistry.add("bible_mix", [("bible_early", 3.0), ("bible_late", 1.0)])
'''


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Writes the source files, a sentencepiece model (jaxlm's trainer) and the task module; imports it."""
    root = tmp_path_factory.mktemp("seqio")
    chapters = [c.replace("\n", " ") for c in corpus.bible_chapters()]
    early, late = root / "early.txt", root / "late.txt"
    early.write_text("\n".join(chapters[:40]) + "\n", encoding="utf-8")
    late.write_text("\n".join(chapters[40:60]) + "\n", encoding="utf-8")
    model = str(root / "bible.model")
    tokenizer_lib.train(chapters[:60], 512, "bpe", model)
    (root / f"{MODULE}.py").write_text(TASKS_MODULE.format(model=model, early=str(early), late=str(late)))
    sys.path.insert(0, str(root))
    module = importlib.import_module(MODULE)
    yield module, root
    sys.path.remove(str(root))


def _reference(module, name, path):
    """The tokens seqio yields for a task, in order, checked against the vocabulary's Python encoder."""
    import seqio

    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, seed=0)
    yielded = [ex["targets"] for ex in ds.as_numpy_iterator()]
    with open(path, encoding="utf-8") as f:
        by_line = [module.VOCAB.encode(line.rstrip("\n")) + [module.VOCAB.eos_id] for line in f]
    assert [list(t) for t in yielded] == by_line
    return by_line


def _exported(folder):
    ds = prepared.open_prepared(folder)
    return [list(ds.docs(np.arange(len(ds.lengths)))[i]) for i in range(len(ds.lengths))], ds


def _cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_task_export_equals_what_seqio_yields_and_is_reused(tasks, tmp_path, capsys):
    module, root = tasks
    out = str(tmp_path / "early")
    args = ["data", "from-seqio", "bible_early", out, "--module", MODULE, "--docs-per-shard", "16", "--no-progress"]
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    assert "40 documents" in stdout and f"data.prepared=\"('{out}',)\"" in stdout
    tokens, ds = _exported(out)
    assert tokens == _reference(module, "bible_early", root / "early.txt")  # exactly, in order
    assert [s["docs"] for s in ds.manifest["shards"]] == [16, 16, 8]
    # The tokenizer is the vocabulary's model, so the tokenizer-hash check of data.prepared applies.
    assert ds.manifest["tokenizer"]["hash"] == hashlib.sha256(module.VOCAB.sp_model).hexdigest()[:16]
    assert prepared.check_tokenizer([ds], "") == os.path.join(out, "tokenizer.model")
    with pytest.raises(ConfigError, match="was tokenized with"):
        prepared.check_tokenizer([ds], _other_tokenizer(tmp_path))

    shard = os.path.join(out, "shard-00000.array_record")
    before = os.stat(shard).st_mtime_ns
    assert _cli(args, capsys)[0] == 0
    assert os.stat(shard).st_mtime_ns == before  # unchanged task: nothing rewritten

    # A changed source file is a different export: the folder is redone, with no stale shard left.
    edited = tmp_path / "edited.txt"
    edited.write_text((root / "early.txt").read_text().split("\n", 1)[0] + "\n")
    module.add("bible_edited", str(edited))
    assert _cli(["data", "from-seqio", "bible_edited", out, "--no-progress"], capsys)[0] == 0
    assert _exported(out)[0] == _reference(module, "bible_edited", edited)
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == [
        "shard-00000.array_record", "shard-00000.lengths.npy"]
    edited.write_text((root / "late.txt").read_text().split("\n", 1)[0] + "\n")
    assert _cli(["data", "from-seqio", "bible_edited", out, "--no-progress"], capsys)[0] == 0
    assert _exported(out)[0] == _reference(module, "bible_edited", edited)


def _other_tokenizer(tmp_path):
    path = str(tmp_path / "other.model")
    tokenizer_lib.train(list(corpus.bible_chapters())[100:110], 400, "bpe", path)
    return path


def test_mixture_exports_each_task_with_token_weights(tasks, tmp_path, capsys):
    module, root = tasks
    out = tmp_path / "mix"
    code, stdout, err = _cli(["data", "from-seqio", "bible_mix", str(out), "--module", MODULE, "--no-progress"], capsys)
    assert code == 0, err
    expected = {"bible_early": _reference(module, "bible_early", root / "early.txt"),
                "bible_late": _reference(module, "bible_late", root / "late.txt")}
    mixture = json.loads((out / "mixture.json").read_text())
    rates = {"bible_early": 3.0, "bible_late": 1.0}
    raw = {n: rates[n] * sum(map(len, docs)) / len(docs) for n, docs in expected.items()}
    for entry in mixture["tasks"]:
        name = entry["task"]
        assert _exported(str(out / entry["folder"]))[0] == expected[name]
        assert entry["rate"] == rates[name]
        assert entry["weight"] == pytest.approx(raw[name] / sum(raw.values()), rel=1e-12)
    assert "data.weights=" in stdout

    # As a training source: data.seqio_task exports into the data cache and feeds jaxlm's mixture.
    config = replace(small_config(), data={"seqio_task": "bible_mix", "seqio_module": MODULE,
                                           "cache_dir": str(tmp_path / "cache")})
    config = replace(config, model={"vocab_size": 512}, train={"progress": False})
    data = pipeline.prepare(config)
    assert isinstance(data.train, pipeline.Mixture)
    assert data.train.weights == pytest.approx([e["weight"] for e in mixture["tasks"]], rel=1e-12)
    cached = tmp_path / "cache" / "seqio" / "bible_mix-train-targets"
    assert sorted(os.listdir(cached)) == [".lock", "bible_early", "bible_late", "mixture.json"]
    assert data.tokenizer_path == str(cached / "bible_early" / "tokenizer.model")
    row = data.train.sources[0][0]
    assert row["inputs"].shape == (config.train.seq_len,)


@pytest.mark.parametrize("args, message", [
    (["bible_erly", "--module", MODULE], "no seqio Task or Mixture named 'bible_erly' after importing "
                                         f"{MODULE}; did you mean 'bible_early'?"),
    (["bible_early", "--module", "no_such_tasks_module"], "seqio module 'no_such_tasks_module' was not found"),
    (["bible_early", "--feature", "inputs"], "has no output feature 'inputs'; it has targets"),
    (["bible_early", "--split", "test"], "has no split 'test'; it has train, validation"),
    (["bible_bytes"], "uses ByteVocabulary; only SentencePieceVocabulary"),
])
def test_bad_input_is_one_clear_line(tasks, tmp_path, capsys, args, message):
    code, _, err = _cli(["data", "from-seqio", args[0], str(tmp_path / "out"), *args[1:], "--no-progress"], capsys)
    assert code == 2
    assert err.startswith("jaxlm: error: ") and err.count("\n") == 1 and message in err, err


def test_seqio_task_does_not_combine_with_prepared(tasks, tmp_path):
    config = replace(small_config(), data={"seqio_task": "bible_early", "prepared": (str(tmp_path),)})
    with pytest.raises(ConfigError, match="cannot be combined with data.prepared"):
        pipeline.prepare(config)


def test_tensorflow_is_not_imported_unless_seqio_is_used():
    code = ("import sys\nfrom jaxlm import cli\nfrom jaxlm.training import pretrain\nfrom jaxlm.data import pipeline\n"
            "from jaxlm.data.prepare import run\n"
            "try:\n    cli.main(['data', 'from-seqio', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio', 'tensorflow_text')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "registered seqio Task or Mixture" in proc.stdout  # the --help text
    assert proc.stdout.strip().endswith("[]")


def _train(args, run_dir, cache, root):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}  # the task module
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", *args, f"train.run_dir={run_dir}", f"data.cache_dir={cache}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_on_a_seqio_mixture_and_resume_exactly(tasks, tmp_path):
    from test_train import SMALL, losses

    _, root = tasks
    args = SMALL + ["train.steps=6", "checkpoint.every=100", "data.seqio_task=bible_mix",
                    f"data.seqio_module={MODULE}", "data.eval_fraction=0.1"]
    whole = _train(args, tmp_path / "whole", tmp_path / "cache", root)
    assert whole.returncode == 0, whole.stderr
    assert "exported seqio task bible_early" in whole.stderr
    first = losses(tmp_path / "whole")
    assert len(first) == 6 and first[6] < first[1]
    stopped = _train(args + ["train.stop_at=3"], tmp_path / "split", tmp_path / "cache", root)
    assert stopped.returncode == 0, stopped.stderr
    assert "already exported" in stopped.stderr  # the first run's export is reused from the cache
    resumed = _train(args, tmp_path / "split", tmp_path / "cache", root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    second = losses(tmp_path / "split")
    assert second.keys() == first.keys()
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-5)


@pytest.mark.slow  # a seqio export of two features and 3 training steps (~20 s)
def test_inputs_and_targets_pair_up_for_an_encoder_decoder(tasks, tmp_path):
    """objective.kind=seq2seq: each example's inputs in the encoder's row and its targets in the decoder's,
    under one segment id, exactly the tokens seqio yields."""
    module, root = tasks
    config = replace(small_config(architecture="t5", vocab_size=512, num_kv_heads=4),
                     data=dict(seqio_task="bible_pairs", seqio_module=MODULE, eval_fraction=0.0,
                               cache_dir=str(tmp_path / "cache")),
                     objective=dict(kind="seq2seq", target_len=48), train=dict(seq_len=64, progress=False))
    data = pipeline.prepare(config)
    lines = (root / "early.txt").read_text(encoding="utf-8").splitlines()
    eos = [module.VOCAB.eos_id]
    want = sorted((tuple(module.VOCAB.encode(line[:40]) + eos), tuple(module.VOCAB.encode(line[40:100]) + eos))
                  for line in lines)
    got = []
    for r in range(len(data.train)):
        row = data.train[r]
        for seg in range(1, row["segment_ids"].max() + 1):
            dec = row["decoder_segment_ids"] == seg
            np.testing.assert_array_equal(row["decoder_inputs"][dec][1:], row["targets"][dec][:-1])
            got.append((tuple(row["inputs"][row["segment_ids"] == seg].tolist()), tuple(row["targets"][dec].tolist())))
    assert sorted(got) == want and len(data.train) < len(lines)  # several examples share a row pair
    # ... and an encoder-decoder trains on them directly.
    from jaxlm.training import pretrain

    run = replace(config, train=dict(steps=3, batch_size=8, log_every=1, eval_every=0, run_dir=str(tmp_path / "run")),
                  checkpoint=dict(async_save=False))
    summary = pretrain.train(run)
    assert summary.step == 3 and np.isfinite(summary.metrics["loss"])
    with pytest.raises(ConfigError, match="objective.kind=seq2seq trains an encoder-decoder"):
        from jaxlm.core.config import validate

        validate(replace(config, data=dict(seqio_task="")))
