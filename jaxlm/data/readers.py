"""Reading raw documents from .txt, .jsonl (.json lines) and .parquet files, robustly.

Nothing in a file stops the run: malformed JSON lines, invalid UTF-8, missing or non-text fields, lines
or documents over `max_doc_chars`, empty and unreadable files are skipped and counted per file in
`FileStats`, which goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import BinaryIO, Iterator

from jaxlm.core.config import ConfigError, PrepareConfig

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclasses.dataclass
class FileStats:
    path: str
    docs: int = 0
    bytes: int = 0
    malformed_json: int = 0
    invalid_utf8: int = 0
    missing_field: int = 0
    huge: int = 0
    empty_file: bool = False
    error: str = ""  # why the file could not be read at all


def expand(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """The sorted files matched by the globs; a pattern that matches nothing is an error."""
    paths = []
    for pattern in patterns:
        found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"input {pattern!r} matches no files; give files or globs of .txt, .jsonl or .parquet")
        bad = [p for p in found if not p.endswith(SUFFIXES)]
        if bad:
            raise ConfigError(f"input {bad[0]} is not .txt, .jsonl or .parquet; rename it or narrow the glob")
        paths += found
    return list(dict.fromkeys(paths))


def _lines(f: BinaryIO, limit: int, stats: FileStats, end: float = float("inf")) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines of a binary file that start before byte `end`, skipping (and counting)
    those longer than `limit` bytes without ever holding more than `limit` bytes of one in memory."""
    while True:
        offset = f.tell()
        if offset >= end:
            return
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            stats.huge += 1
            while line and not line.endswith(b"\n"):
                line = f.readline(limit + 1)
            continue
        yield offset, line


def _seek_line(f: BinaryIO, start: int) -> None:
    """Moves to the first line that starts at or after byte `start`: a block boundary inside a line belongs
    to the block that holds the line's start."""
    if start <= 0:
        return
    f.seek(start - 1)
    if f.read(1) == b"\n":
        return
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _decode(data: bytes, stats: FileStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None


def _jsonl(path: str, c: PrepareConfig, stats: FileStats, start: int = 0, end: float = float("inf")) -> Iterator[tuple[int, str]]:
    """(byte offset, text) of the records whose lines start in [start, end)."""
    with open(path, "rb") as f:
        _seek_line(f, start)
        for offset, line in _lines(f, 4 * c.max_doc_chars, stats, end):  # JSON escapes can take several bytes per char
            if not line.strip():
                continue
            text = _decode(line, stats)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                stats.malformed_json += 1
                continue
            value = record.get(c.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                stats.missing_field += 1
                continue
            yield offset, value


def _txt(path: str, c: PrepareConfig, stats: FileStats) -> Iterator[str]:
    """Documents are blank-line-separated blocks, single lines, or the whole file (`txt_documents`)."""
    block: list[str] = []
    with open(path, "rb") as f:
        for _, raw in _lines(f, 4 * c.max_doc_chars, stats):
            line = _decode(raw, stats)
            if line is None:
                continue
            if c.txt_documents == "line" or (c.txt_documents == "blank_line" and not line.strip()):
                block.append(line)
                text = "".join(block).strip()
                block = []
                if text:
                    yield text
            else:
                block.append(line)
    text = "".join(block).strip()
    if text:
        yield text


def _parquet(path: str, c: PrepareConfig, stats: FileStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if c.text_field not in f.schema_arrow.names:
        stats.error = f"no column {c.text_field!r} (columns: {', '.join(f.schema_arrow.names)})"
        stats.missing_field += f.metadata.num_rows
        return
    for batch in f.iter_batches(columns=[c.text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                stats.missing_field += 1
                continue
            yield value


def splittable(path: str) -> bool:
    """Whether `read_positioned` can read the file in byte ranges (one JSON record per line)."""
    return path.endswith((".jsonl", ".json"))


def read_positioned(path: str, c: PrepareConfig, stats: FileStats, start: int = 0,
                    end: float = float("inf")) -> Iterator[tuple[int, str]]:
    """(position, text) of one file's documents, counting everything skipped into `stats`; never raises on
    bad content. The position orders documents within the file: the byte offset of a JSONL record (so a
    byte range [start, end) of the file reads the records whose lines start in it), else the ordinal."""
    try:
        if start == 0:
            stats.bytes = os.path.getsize(path)
            stats.empty_file = stats.bytes == 0
        if splittable(path):
            docs = _jsonl(path, c, stats, start, end)
        else:
            docs = enumerate((_parquet if path.endswith(".parquet") else _txt)(path, c, stats))
        for position, text in docs:
            if len(text) > c.max_doc_chars:
                stats.huge += 1
                continue
            stats.docs += 1
            yield position, text
    except Exception as e:  # noqa: BLE001 - an unreadable file (I/O error, corrupt Parquet) is reported, not fatal
        stats.error = f"{type(e).__name__}: {e}"


def read(path: str, c: PrepareConfig, stats: FileStats) -> Iterator[str]:
    """Documents of one file, counting everything skipped into `stats`. Never raises on bad content."""
    return (text for _, text in read_positioned(path, c, stats))
