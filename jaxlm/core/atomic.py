"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a partial one.

Each write goes to a temporary name in the same directory (same filesystem, so the rename is atomic) and
is renamed over the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil


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
