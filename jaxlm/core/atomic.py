"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a partial one.

Each write goes to a temporary name in the same directory (same filesystem, so the rename is atomic) and
is renamed over the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from jaxlm.core.config import ConfigError


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temporary path to write; renames it to `path` on success and removes it on failure."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.remove(tmp)


@contextlib.contextmanager
def new_directory(out: str):
    """Yields a temporary directory to fill; it becomes `out` (absent or empty before) only when complete and
    is removed on failure, so an output directory is never left half-written."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj, indent: int = 2, ensure_ascii: bool = True) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=ensure_ascii)


def copy_file(src: str, dst: str) -> None:
    """Copies `src` to `dst` atomically; nothing to do when they are the same file."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
