"""Reading and copying the files of a model directory without leaving it.

A model directory may come from anyone. Every file merge reads or copies goes through `checked_file`:
a symbolic link is followed only when its target stays inside the model directory (or, for a Hugging
Face cache snapshot `.../snapshots/REV`, inside the repository's `blobs/` folder, where the cache keeps the
files its links point to), and the target must be a regular file: a link to /etc/passwd or /dev/zero,
a FIFO or a device is a one-line RlgenError naming the file, before anything is opened.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from rlgen.errors import RlgenError, show_value


def allowed_roots(root: Path) -> list[Path]:
    """The resolved folders a file of model directory `root` may live in."""
    real = Path(root).resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # the Hugging Face cache: snapshots/REV/* link to ../../blobs/*
        roots.append(real.parent.parent / "blobs")
    return roots


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def checked_file(root: Path, path: Path) -> Path:
    """The resolved path of `path` (a file of model directory `root`), refusing links that leave the
    directory and anything that is not a regular file."""
    roots = allowed_roots(root)
    try:
        real = Path(path).resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise RlgenError(f"{path}: no such file (or a broken symbolic link)") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise RlgenError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not inside(real, roots):
        raise RlgenError(f"{path}: a symbolic link to {show_value(str(real))}, outside the model directory "
                         f"{root} (refused)")
    if not stat.S_ISREG(mode):
        raise RlgenError(f"{path}: not a regular file (a FIFO, device or socket; refused)")
    return real


def read_text(root: Path, path: Path) -> str:
    """The text of a small file of the model directory (JSON configs), checked as in checked_file."""
    real = checked_file(root, path)
    try:
        return real.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RlgenError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RlgenError(f"cannot read {path}: {exc.strerror or exc}") from None


def copy_file(root: Path, src: Path, dst: Path) -> None:
    """Copy one file of the model directory (its target's bytes, never a link), checked first."""
    real = checked_file(root, src)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise RlgenError(f"cannot read {src}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):  # swapped since checked_file
            raise RlgenError(f"{src}: not a regular file (refused)")
        with open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    shutil.copystat(real, dst)


def copy_tree(root: Path, src: Path, dst: Path) -> None:
    """Copy a folder of the model directory file by file (copy_file); links to folders are refused."""
    if src.is_symlink():
        raise RlgenError(f"{src}: a symbolic link to a folder (refused: only regular files are copied)")
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.is_dir() and not item.is_symlink():
            copy_tree(root, item, dst / item.name)
        elif item.is_symlink() and item.is_dir():
            raise RlgenError(f"{item}: a symbolic link to a folder (refused: only regular files are copied)")
        else:
            copy_file(root, item, dst / item.name)
