"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A reader (or a crash) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
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
        if getattr(e, "errno", None) is None and 0 <= free < (1 << 20):
            why = f"no space left on the device ({free} bytes free)"
        else:
            why = write_failure(e)
            if why.startswith("no space"):
                why += f" ({free} bytes free)"
        kept = "the previous file is unchanged" if Path(path).exists() else "nothing was written"
        raise SelfsupError(f"cannot write {path}: {why}; {kept}") from e


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failure(e: BaseException) -> str:
    """Why a write failed, in words: a full disk (or quota, or file-size limit) says so."""
    if getattr(e, "errno", None) in NO_SPACE:
        return "no space left on the device"
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def save_bytes(data: bytes, path: str | Path) -> None:
    """Bytes, atomically (a file serialised in memory first: nothing half-written remains)."""

    def write(f: IO[bytes]) -> None:
        f.write(data)

    _write_with(path, write)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically."""
    _write_with(path, lambda f: torch.save(obj, f))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    """np.save, atomically."""
    _write_with(path, lambda f: np.save(f, array))


def atomic_write_text(text: str, path: str | Path) -> None:
    """UTF-8 text, atomically. Characters UTF-8 cannot hold (the stand-ins Python uses for a
    file name's undecodable bytes) are written as backslash escapes."""
    save_bytes(text.encode("utf-8", "backslashreplace"), path)


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
        obj = json.loads(read_regular(path, JSON_MAX_BYTES))
    except RecursionError:  # brackets nested deeper than any file selfsup writes
        raise SelfsupError(f"{path} cannot be read (nested too deeply); {fix}") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise SelfsupError(f"{path} cannot be read ({why}); {fix}") from None
    if not isinstance(obj, dict):
        raise SelfsupError(f"{path} is damaged (not {what}); {fix}")
    return obj


JSON_MAX_BYTES = 256 << 20  # no JSON file selfsup writes comes near this


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. A FIFO, a device or a folder in
    its place is refused before it is opened (reading a FIFO would wait forever).

    Raises:
        OSError: no such file, not a regular file, or larger than ``limit`` (``strerror`` says).
    """
    st = _regular(path)
    if st.st_size > limit:
        raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than selfsup ever writes there")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _regular(path: str | Path) -> os.stat_result:
    """``path``'s status, or OSError when it is not a regular file (checked before opening)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return st


def confined(folder: str | Path, name: str) -> Path:
    """``folder/name``, checked not to lead out of ``folder`` through a symbolic link (a link
    inside a run folder to a file or folder elsewhere is never read or written through).

    Raises:
        SelfsupError: the path resolves outside ``folder``.
    """
    folder = Path(folder)
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise SelfsupError(f"{path} is a link that leads out of {folder} (to "
                           f"{path.resolve()}); selfsup reads and writes only inside a run "
                           f"folder: remove the link")
    return path


LOCK = ".selfsup.lock"  # in a run folder: held (flock) by the process writing it


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs: one writer per run folder. The lock is an
    ``flock`` on ``folder/.selfsup.lock``, so a process killed with ``kill -9`` releases it
    with its life; the file itself stays (it is empty but for the holder's pid).

    Raises:
        SelfsupError: another process holds it (names its pid), or the folder cannot be made.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(confined(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise SelfsupError(f"cannot lock {folder} ({e.strerror or e}): is the disk read-only, "
                           f"or the folder not yours?") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            raise SelfsupError(f"{folder} is being written by another selfsup process (pid "
                               f"{holder}); one process writes a run folder at a time: wait "
                               f"for it to finish, or use another --name") from None
        with contextlib.suppress(OSError):  # the pid is for the message above, nothing more
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def load_array(path: str | Path, ndim: int, kind: str, rows: int | None = None) -> np.ndarray:
    """A ``.npy`` file selfsup wrote, checked before use: no pickled objects, ``ndim``
    dimensions, numbers of ``kind`` (``"f"`` floating point, ``"i"`` integers), and ``rows``
    rows when given.

    Raises:
        SelfsupError: names the file and what is wrong with it, and how to write it again.
    """
    path = Path(path)
    fix = f"run `selfsup evaluate {path.parent}` to write it again"
    try:
        _regular(path)
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
        raise SelfsupError(f"{path} cannot be read ({why}); {fix}") from None
    ok_kind = a.dtype.kind in ("f" if kind == "f" else "iu")
    if a.ndim != ndim or not ok_kind or (rows is not None and a.shape[0] != rows):
        want = f"{ndim}-D {'float' if kind == 'f' else 'integer'} array" + (
            f" of {rows} rows" if rows is not None else "")
        raise SelfsupError(f"{path} is not what selfsup wrote there (a {want}; it holds "
                           f"{a.dtype} of shape {a.shape}); {fix}")
    return a  # type: ignore[no-any-return]


NAME_MAX = 255  # bytes in one file or folder name, the usual file systems' limit


def check_output(path: str | Path, flag: str, made_here: Callable[[Path], bool],
                 own_names: str, fits: Callable[[str], bool]) -> Path:
    """Where a command will write its output, checked before the work: a file name the file
    system accepts, in an existing folder; never over a file this command did not make for this
    purpose; inside a run folder (one holding ``config.json``) only under the command's own
    names, so that no run's files are replaced.

    Args:
        flag: the option that named the path (for the messages).
        made_here: whether an existing file is an earlier output of this command.
        own_names: the command's own names, for the message (``embeddings_*.npy``).
        fits: whether a name is one of them.

    Raises:
        SelfsupError: says which rule and what to do.
    """
    path = Path(path)
    size = len(path.name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise SelfsupError(f"{flag}: the name {path.name[:40]}... is {size} bytes; file "
                           f"systems allow at most {NAME_MAX}: choose a shorter one")
    if not path.parent.is_dir():
        raise SelfsupError(f"{flag}: folder {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise SelfsupError(f"{flag} {path} exists and is not a plain file (a folder, a link or "
                           f"a device): choose another name")
    if path.exists() and not made_here(path):
        raise SelfsupError(f"{flag} {path} exists and is not an earlier output of this command; "
                           f"selfsup never writes over a file it did not make: choose another "
                           f"name, or move that file away")
    if (path.parent / "config.json").is_file() and not fits(path.name):
        raise SelfsupError(f"{flag} {path}: {path.parent} is a run folder, where this command "
                           f"writes only {own_names}, so that none of the run's own files is "
                           f"replaced")
    return path
