"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A reader (or a crash) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from selfsup.errors import SelfsupError


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not the
    temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_with(path: str | Path, writer: Callable[[IO[bytes]], None], suffix: str = "") -> None:
    """Write through ``writer`` atomically; a failed write (disk full, ...) leaves the previous
    file as it was and raises ``SelfsupError`` saying so."""
    try:
        with atomic_path(path, suffix) as tmp, open(tmp, "wb") as f:
            writer(f)
    except (OSError, RuntimeError) as e:
        # torch.save reports a short write as a RuntimeError of its archive writer.
        if isinstance(e, RuntimeError) and "inline_container" not in str(e) \
                and "PytorchStreamWriter" not in str(e):
            raise
        parent = Path(path).parent
        free = shutil.disk_usage(parent).free if parent.is_dir() else -1
        err = getattr(e, "errno", None)
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or 0 <= free < (1 << 20):
            why = f"no space left on the device ({free} bytes free)"
        else:
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        kept = "the previous file is unchanged" if Path(path).exists() else "nothing was written"
        raise SelfsupError(f"cannot write {path}: {why}; {kept}") from e


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically."""
    _write_with(path, lambda f: torch.save(obj, f))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    """np.save, atomically."""
    _write_with(path, lambda f: np.save(f, array))


def atomic_write_text(text: str, path: str | Path) -> None:
    """UTF-8 text, atomically. Characters UTF-8 cannot hold (the stand-ins Python uses for a
    file name's undecodable bytes) are written as backslash escapes."""
    data = text.encode("utf-8", "backslashreplace")

    def write(f: IO[bytes]) -> None:
        f.write(data)

    _write_with(path, write)


def save_json(obj: Any, path: str | Path) -> None:
    """JSON (indented, sorted keys), atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def save_figure(fig: Any, path: str | Path) -> None:
    """A matplotlib figure as PNG, atomically."""
    _write_with(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"),
                suffix=".png")


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """A JSON file's object, or ``SelfsupError`` saying which file is damaged and ``fix``.

    Args:
        what: the kind of object expected, for the message (``"a JSON object"``).
        fix: what the user can do about a damaged file.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise SelfsupError(f"{path} cannot be read ({why}); {fix}") from None
    if not isinstance(obj, dict):
        raise SelfsupError(f"{path} is damaged (not {what}); {fix}")
    return obj
