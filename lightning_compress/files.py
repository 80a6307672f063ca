"""Files written so that a reader never sees half of one."""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary file beside ``path`` and move it into place, so readers never see half a file.

    The temporary is ``.<stem>-<pid>@<host>-<random><suffix>`` (the real suffix last: a writer such as
    matplotlib infers the format from it). Before writing, the temporaries of ``path`` that a killed
    writer on this host left behind (its pid no longer alive) are removed; a live writer's never are.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> write_atomically(target, lambda temporary: temporary.write_text("done"))
        >>> [p.name for p in target.parent.iterdir()], target.read_text()
        (['notes.txt'], 'done')
    """
    _remove_abandoned_temporaries(path)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}-{os.getpid()}@{_host()}-", suffix=path.suffix
    )
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())  # as open() would have made it (mkstemp makes it 0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file mode creation mask (read by setting it, then set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_abandoned_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writer, a process on this host, is gone."""
    name = re.compile(rf"\.{re.escape(path.stem)}-(\d+)@{re.escape(_host())}-\w+{re.escape(path.suffix)}")
    for candidate in path.parent.glob(f".{glob.escape(path.stem)}-*{glob.escape(path.suffix)}"):
        match = name.fullmatch(candidate.name)
        if match and _process_is_gone(int(match[1])):
            candidate.unlink(missing_ok=True)


def _host() -> str:
    """This host's name (its first 40 characters) in those a temporary's name allows: letters, digits, ``_``."""
    return re.sub(r"\W", "_", socket.gethostname()[:40], flags=re.ASCII) or "host"


def _process_is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (signal 0 checks it exists and sends nothing)."""
    if os.name != "posix":  # on Windows, os.kill(pid, 0) would send CTRL_C_EVENT
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: it runs under another user; OverflowError: not a pid
        pass
    return False
