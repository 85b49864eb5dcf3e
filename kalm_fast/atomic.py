"""Publishing finished outputs atomically: a crash leaves either the old output or the new one, never a mix.

Used by the soup (files and folders) and the trainer's greedy soup folder. Below everything else in kalm_fast."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
