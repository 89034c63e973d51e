"""One tokenizer interface, two backends: a sentencepiece model trained here and a Hugging Face tokenizer.json
answer the same calls the same way on the same text, and a run directory's file picks the backend."""

import json
import os
import shutil

import pytest

from jaxlm.core import rundir
from jaxlm.core.config import ConfigError
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "起初，神创造天地。地是空虚混沌，渊面黑暗。"]
CORPUS = TEXTS * 20 + [f"day {i}: and the evening and the morning were the {i}th day." for i in range(200)]


def _sentencepiece(directory: str) -> str:
    path = os.path.join(directory, "tiny.model")
    tokenizer_lib.train(CORPUS, 320, "bpe", path)
    return path


def _tokenizer_json(directory: str) -> str:
    """A byte-level BPE tokenizer.json with <s> and </s>, and no config beside it (their usual names apply)."""
    from tokenizers import Tokenizer as HFFile, decoders, models, pre_tokenizers, trainers

    tok = HFFile(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = os.path.join(directory, "tiny.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    return {"sentencepiece": _sentencepiece(directory), "hf": _tokenizer_json(directory)}


@pytest.fixture(params=["sentencepiece", "hf"])
def tok(request, files) -> Tokenizer:
    return tokenizer_lib.load(files[request.param])


def test_the_file_name_picks_the_backend(files):
    assert type(tokenizer_lib.load(files["sentencepiece"])) is SentencePieceTokenizer
    assert type(tokenizer_lib.load(files["hf"])) is HFTokenizer


def test_both_backends_satisfy_the_interface(tok):
    assert isinstance(tok, Tokenizer) and os.path.isfile(tok.path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(type(i) is int and 0 <= i < tok.vocab_size() for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id(), *ids, tok.eos_id()]) == text  # special tokens are left out
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode(iter(tok.encode(TEXTS[0]))) == TEXTS[0]  # any iterable of ids


def test_special_tokens(tok):
    assert (tok.id_to_piece(tok.bos_id()), tok.id_to_piece(tok.eos_id())) == ("<s>", "</s>")
    assert all(-1 <= i < tok.vocab_size() for i in (tok.pad_id(), tok.unk_id()))
    # Only Hugging Face tokenizers read a special token written out in text as that token.
    assert (tok.encode("</s>") == [tok.eos_id()]) == tok.special_tokens_in_text


def test_vocab_size(files):
    from tokenizers import Tokenizer as HFFile

    assert tokenizer_lib.load(files["sentencepiece"]).vocab_size() == 320
    assert tokenizer_lib.load(files["hf"]).vocab_size() == HFFile.from_file(files["hf"]).get_vocab_size()


def test_load_for_run_picks_the_run_file(files, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        tokenizer_lib.load_for_run(run)
    assert tokenizer_lib.copy_into(files["sentencepiece"], run) == os.path.join(run, rundir.SENTENCEPIECE)
    tok = tokenizer_lib.load_for_run(run)
    assert type(tok) is SentencePieceTokenizer and tok.path == os.path.join(run, rundir.SENTENCEPIECE)
    tokenizer_lib.copy_into(files["hf"], run)  # both: tokenizer.json wins
    tok = tokenizer_lib.load_for_run(run)
    assert type(tok) is HFTokenizer and tok.path == os.path.join(run, rundir.TOKENIZER_JSON)
    assert sorted(os.listdir(run)) == sorted(rundir.TOKENIZER_FILES)  # no temporary files left behind
    assert tokenizer_lib.copy_into(tok.path, run) == tok.path  # copying a file onto itself is a no-op


def test_special_tokens_from_tokenizer_config(tmp_path):
    """Qwen-style: EOS named by tokenizer_config.json, no BOS (documents start with <|endoftext|>)."""
    from hf_models import save_tokenizer

    save_tokenizer(str(tmp_path))
    tok = tokenizer_lib.load_for_run(str(tmp_path))
    assert (tok.id_to_piece(tok.eos_id()), tok.id_to_piece(tok.bos_id())) == ("<|im_end|>", "<|endoftext|>")
    assert tok.id_to_piece(tok.pad_id()) == "<|endoftext|>" and tok.id_to_piece(tok.unk_id()) == "<unk>"


def test_bad_files_are_clear_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tokenizer_lib.load(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        tokenizer_lib.load(str(bad))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a Hugging Face tokenizer.json"):
        tokenizer_lib.load(str(tmp_path / "bad.json"))
    # A tokenizer.json without an end-of-text token cannot separate training documents.
    no_eos = json.load(open(files["hf"]))
    no_eos["added_tokens"] = [t for t in no_eos["added_tokens"] if t["content"] != "</s>"]
    no_eos["model"]["vocab"].pop("</s>")
    (tmp_path / "no_eos.json").write_text(json.dumps(no_eos))
    with pytest.raises(ConfigError, match="no end-of-text token"):
        tokenizer_lib.load(str(tmp_path / "no_eos.json"))
    shutil.copyfile(tmp_path / "no_eos.json", tmp_path / rundir.TOKENIZER_JSON)
    assert tokenizer_lib.load_for_run(str(tmp_path)).eos_id() == -1  # generation from such a model still works


def test_extra_ids_are_t5s_sentinels_at_the_end_of_the_vocabulary(tmp_path, capsys):
    """`jaxlm tokenizer train --extra-ids 8`: 8 of the 600 pieces are <extra_id_7> .. <extra_id_0>, the last
    id being <extra_id_0> (denoise.t5_sentinels), each one piece wherever it appears in text."""
    from jaxlm import cli
    from jaxlm.data import corpus, denoise

    with open(corpus.bible_path(), encoding="utf-8") as f:
        text = [json.loads(line)["text"] for _, line in zip(range(3000), f)]
    (tmp_path / "kjv.txt").write_text("\n".join(text) + "\n")
    out = str(tmp_path / "t5.model")
    assert cli.main(["tokenizer", "train", str(tmp_path / "kjv.txt"), "--out", out, "--vocab-size", "600",
                     "--extra-ids", "8"]) == 0
    assert "the last 8 <extra_id_N>" in capsys.readouterr().out
    tok = tokenizer_lib.load(out)
    assert tok.vocab_size() == 600
    import sentencepiece as spm

    ids = [spm.SentencePieceProcessor(model_file=out).piece_to_id(f"<extra_id_{i}>") for i in range(8)]
    assert ids == denoise.t5_sentinels(600, 8) == list(range(599, 591, -1))
    encoded = list(tok.encode("In the beginning <extra_id_3> the earth."))
    assert ids[3] in encoded and tok.decode(encoded) == "In the beginning <extra_id_3> the earth."
    with pytest.raises(ConfigError, match="under half the vocabulary"):
        tokenizer_lib.train(text, 600, "bpe", str(tmp_path / "bad.model"), extra_ids=300)
