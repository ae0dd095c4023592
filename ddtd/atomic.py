"""Atomic file output: write to a temporary file beside the target, then rename.

Guarantees of :func:`atomic_path`:

* a crash, an exception or Ctrl-C while writing leaves no new file at the output path, and an
  existing file there untouched; the temporary file is removed;
* Ctrl-C (SIGINT) and SIGTERM during the write are held until the body returns (libraries
  such as h5py would otherwise swallow them inside their C callbacks and finish the write); the
  held signal then cancels the rename and is raised as :class:`KeyboardInterrupt`, so the run
  ends with exit code 130 and the old file intact. Long writers call :func:`check_interrupt`
  between pieces to stop early;
* the new file gets the old file's permission bits, or ``0666 & ~umask`` for a new file (not
  the ``0600`` of a temporary file);
* a temporary file left by a run that was killed (SIGKILL, power loss) is recognised by its
  name, ``.<target>.ddtd-<pid>-<random>.tmp``, and removed by the next write to the same target
  once process ``<pid>`` is gone (logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import stat
import threading
from pathlib import Path

__all__ = ["atomic_path", "check_interrupt", "clean_stale_temporaries"]

log = logging.getLogger("ddtd")

_pending: list[int] = []  # signals received while a write was in progress


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.ddtd-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporary files of ddtd's own naming for ``target`` whose writer process is gone.

    Returns the removed paths (each one is logged)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.ddtd-(\d+)-[0-9a-f]+\.tmp$")
    removed = []
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
                log.warning("removed %s, a temporary file left by an interrupted ddtd run", p)
    return removed


def check_interrupt() -> None:
    """Raise :class:`KeyboardInterrupt` if Ctrl-C / SIGTERM arrived during the current write."""
    if _pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _held_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def hold(signum, _frame):
        _pending.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _final_mode(path: Path) -> int:
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    Example::

        with atomic_path("out.h5") as tmp:
            write_everything(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = _temp_name(path)
    _pending.clear()
    with _held_signals():
        try:
            tmp.touch(mode=0o600, exist_ok=False)
            yield tmp
            check_interrupt()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _final_mode(path))
            check_interrupt()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            _pending.clear()
