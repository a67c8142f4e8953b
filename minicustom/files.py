"""Files written so that nothing is ever half-written or lost, and JSON read with errors that name the file.

Every write goes to a temporary file beside its target, is fsynced, and is renamed into place; several
files are written all or nothing (`atomic_write_all`): only when every one is complete are they renamed.
Temp files are named .<target>.mc-<host>-<pid>.<random>.tmp, so a later write into the folder can tell one
that an interrupted run left behind from one that a live process is still writing, and removes the first.
A leaf module (no torch): plotting, checkpoints, adapters and run state all write through it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path


def read_json(path: Path, error: type[ValueError] = ValueError):
    """The JSON in `path`, or `error` naming the file: not UTF-8, not JSON (with the line), or an object
    that repeats a key (json.loads would keep the last copy silently)."""
    def unique(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise error(f"{path}: key {key!r} appears twice in one object")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None


# Temp files are named .<target>.mc-<host>-<pid>.<random>.tmp, so a later write can tell an abandoned one
# (its process is gone) from one a live process is still writing (two DPO ranks share a reference cache).
_TEMP = re.compile(r"\.(?P<target>.+)\.mc-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
_OLD_TEMP = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's, before the pid was kept
_ABANDONED_AFTER = 24 * 3600  # seconds: another machine's temp file this old is abandoned
# A dead pid is not enough alone: containers that share a hostname have their own pid namespaces. A live
# writer touches its file as it writes and renames it at once, so one untouched for a minute is not live.
_QUIET_FOR = 60


def host_tag() -> str:
    """This machine's name as temp file names carry it: letters, digits and _, at most 32 characters."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill(pid, 0) sends CTRL_C_EVENT: there, only the age rule applies
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _remove_abandoned_temps(folder: Path, targets: set[str]):
    """Remove the temp files of interrupted writes into `folder`: ours whose process is gone (or, from
    another machine, a day old), and the older unmarked kind for the names about to be written."""
    host, now = host_tag(), time.time()
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        if m := _TEMP.fullmatch(entry.name):
            pid = int(m["pid"])
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            gone = m["host"] == host and pid not in (0, os.getpid()) and not _alive(pid) and age > _QUIET_FOR
            abandoned = age > _ABANDONED_AFTER or gone
        else:
            abandoned = bool((m := _OLD_TEMP.fullmatch(entry.name)) and m["target"] in targets)
        if abandoned and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


def io_error(e: BaseException, path: Path) -> OSError | None:
    """An I/O failure while writing, as an OSError naming the file written (not its temp name), or None.
    safetensors reports a full disk as SafetensorError("... (os error 28)")."""
    code = e.errno if isinstance(e, OSError) else None
    if type(e).__name__ == "SafetensorError" and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m[1])
    if code is None:
        return OSError(f"cannot write {path}: {e}") if isinstance(e, OSError) else None
    return OSError(code, os.strerror(code), str(path))


def _write_temp(path: Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) on a new temp file beside path, fsynced; the temp file is removed if anything fails."""
    tmp = path.parent / f".{path.name}.mc-{host_tag()}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # mode 0o666 under the umask, as open() creates any file (tempfile.mkstemp would give 0o600)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that recreated the file
            os.chmod(tmp, mode)
        return tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (error := io_error(e, path)) is not None:
            raise error from None
        raise


def atomic_write_all(writes: list[tuple[Path, Callable[[Path], object]]],
                     before_rename: Callable[[], object] | None = None):
    """All or nothing: run each write(tmp) on a temp file beside its path and fsync it; only when every one
    succeeded are they renamed into place, in order (`before_rename()` runs just before the first rename).
    A failure while writing leaves no temp file and no target changed."""
    writes = [(Path(p), w) for p, w in writes]
    for folder in {p.parent for p, _ in writes}:
        _remove_abandoned_temps(folder, {p.name for p, _ in writes if p.parent == folder})
    temps = []
    try:
        for path, write in writes:
            temps.append(_write_temp(path, write))
        if before_rename is not None:
            before_rename()
        for (path, _), tmp in zip(writes, temps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {p.parent for p, _ in writes}:  # make the renames themselves durable
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # not every file system can fsync a directory


def atomic_write(path: Path, write):
    """Run write(tmp) on a temporary file beside path, fsync it, and rename it to path: path is
    never seen half-written, and a crash leaves at most a stray .tmp file (removed by a later write)."""
    atomic_write_all([(path, write)])


def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))
