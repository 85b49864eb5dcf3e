"""Writing outputs atomically: a crash leaves either the old output or the new one, never a mix.

The one home of atomic publish / write / fsync for the soup, the trainer, kalm_fast.eval and Embedder.save_pretrained.
Below everything else in kalm_fast."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def fsync_dir(path: Path) -> None:
    """Makes the renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Deletes a file, a link or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, output: Path, aside: Path) -> None:
    """Renames the finished ``tmp`` (a file or a folder) to ``output``. A file replaces a file atomically; otherwise
    an existing output is first renamed to ``aside`` (a hidden sibling), the new one renamed in, and the old one
    deleted -- or renamed back if the second rename fails. A crash between the two renames leaves the old output
    complete at ``aside`` (the soup's stale-temporary clean-up puts it back)."""
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
    elif tmp.is_file() and output.is_file():
        os.replace(tmp, output)
    else:
        os.rename(output, aside)
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(aside, output)
            raise
        remove(aside)
    fsync_dir(output.absolute().parent)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[TextIO]:
    """A text file written through the block's file object (a hidden sibling), fsynced and renamed over ``path`` when
    the block ends: readers (and a restart after a crash) see the old file or the new one, never half of one. If the
    block raises, the sibling is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically (``writing``)."""
    with writing(path) as f:
        f.write(text)


def write_json(path: Path, obj, indent: int = 1) -> None:
    """``obj`` as JSON (a trailing newline), atomically (write_text)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file under the folder ``path`` and the folder itself (before it is renamed into place); a file
    ``path``: that file."""
    path = Path(path)
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if path.is_dir():
        fsync_dir(path)
