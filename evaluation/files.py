"""Writing files so that a killed process, a full disk or a read-only folder never leaves half a file.

Every file the harness writes (run records, the teacher's weights, feature caches, memos)
goes through ``write_atomically``: the content goes to a temporary file beside the target,
which is then renamed over it, and the temporary file is removed whatever fails. The report's
file and folder names are made from dataset, backbone and mode labels by ``safe_name``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable


class WriteError(OSError):
    """A file could not be written; the message names it and what to check."""


def write_atomically(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the folder {path.parent} ({exc.strerror or exc}); "
                         f"choose a folder you can write to") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, WriteError):
            # torch.save on a full disk raises RuntimeError("... unexpected pos ..."), which names no file.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            raise WriteError(f"cannot write {path} ({reason}); is the disk full or the folder read-only?") from exc
        raise


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(obj, path) -> None:
    write_text_atomically(path, json.dumps(obj, indent=1))


def safe_name(name) -> str:
    """``name`` usable as (part of) a file or folder name: runs of other characters become one ``_``."""
    return re.sub(r"[^\w.+-]+", "_", str(name))
