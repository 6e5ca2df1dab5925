"""Output folders: written under a staging name beside the destination and renamed when complete, with the
source's side files (tokenizer, processor, generation config) copied along.

At every instant the destination is absent, the complete old folder or the complete new one. The new folder is
written as ``.<name>.staging-<pid>-<hex>`` beside it and renamed in (a rename within one folder is atomic on POSIX).
A folder being replaced is first renamed aside to ``.<name>.old-<pid>-<hex>`` and deleted once the new one is in,
under a staging name again, so that an ``old`` name always holds a complete copy. A run that dies without
cleaning up (SIGKILL, power loss) leaves these names behind; the next run for the same destination finds them and,
when the pid in the name is gone, deletes staging folders and puts an old copy back if no new one replaced it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import threading

from .safetensors_io import INDEX, CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
STAGING, OLD = "staging", "old"

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM while an output is staged: raised as Ctrl-C's KeyboardInterrupt is, so that the same cleanup runs."""


def _sibling(dst: str, kind: str) -> str:
    """A fresh ``kind`` name beside ``dst`` carrying this process's id (how a later run tells whether it died)."""
    dst = os.path.abspath(dst)
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: str) -> None:
    """Delete a folder and everything in it, or a file."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _owner_gone(pid: int) -> bool:
    """Whether the process that named a staging or old folder has ended. Our own pid counts as ended: a process
    holds no staging for a destination while it checks that destination, so such a folder is from an earlier
    process that had the same pid (a container starts every run with the same pid)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process, alive
        return False
    return False


def _settle_old(old: str, dst: str) -> str:
    """Put the complete old copy ``old`` back at ``dst`` if nothing replaced it, else delete it (renamed to a
    staging name first: a run killed while deleting it leaves staging, not a partial ``old``). Says which."""
    if os.path.lexists(dst):
        trash = _sibling(dst, STAGING)
        os.rename(old, trash)
        _remove(trash)
        return "removed"
    os.rename(old, dst)
    return "put back"


def recover_leftovers(dst: str) -> None:
    """Settle what killed runs left beside ``dst``: remove their staging folders, put back or remove their old
    copies, and name on the log the folders of runs still going (left alone)."""
    dst = os.path.abspath(dst)
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"\.{re.escape(base)}\.({STAGING}|{OLD})-(\d+)-[0-9a-f]+")
    for name in sorted(os.listdir(parent)):
        match = pattern.fullmatch(name)
        if not match:
            continue
        path, kind, pid = os.path.join(parent, name), match[1], int(match[2])
        if not _owner_gone(pid):
            log.warning("left %s alone: the run that writes it (pid %d) is still going", path, pid)
        elif kind == STAGING:
            _remove(path)
            log.warning("removed %s, left by a run that was killed (pid %d)", path, pid)
        else:
            done = _settle_old(path, dst)
            log.warning("%s %s: the copy of %s that a killed run (pid %d) was replacing", done, path, dst, pid)


def prepare_destination(dst: str, *, overwrite: bool) -> None:
    """Recover what killed runs left beside ``dst`` (:func:`recover_leftovers`), then check that ``dst`` can be
    written: CheckpointError if it exists without ``overwrite``, OSError if its folder cannot be created or
    written. Cheap: call it before loading anything."""
    recover_leftovers(dst)
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"destination {dst} already exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(folder):  # the nearest folder that exists: the others are created in it
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write {dst}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst}: the folder {folder} is not writable")


class _Interrupts:
    """Ctrl-C and SIGTERM while an output is staged. SIGTERM raises :class:`Terminated` (by default it ends the
    process at once, skipping all cleanup); both are held while ``holding`` (the swap and the cleanup, which an
    exception would cut short) and raised by :meth:`release`."""

    def __init__(self):
        self.holding, self.held = False, None

    def handle(self, signum, frame):
        error = Terminated(f"terminated by signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()
        if not self.holding:
            raise error
        self.held = self.held or error

    def release(self):
        if self.held:
            raise self.held


@contextlib.contextmanager
def _interrupts():
    """Route Ctrl-C and SIGTERM through an :class:`_Interrupts`, where their handlers are still the default ones
    (a program's own handler stays) and in the main thread (Python installs handlers nowhere else)."""
    interrupts = _Interrupts()
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [s for s, default in defaults.items()
            if threading.current_thread() is threading.main_thread() and signal.getsignal(s) is default]
    for s in ours:
        signal.signal(s, interrupts.handle)
    try:
        yield interrupts
    finally:
        for s in ours:
            signal.signal(s, defaults[s])


@contextlib.contextmanager
def staged_folder(dst: str, *, overwrite: bool):
    """Yield a fresh staging folder beside ``dst``; on success it replaces ``dst``, on any error, Ctrl-C or SIGTERM
    it is removed and ``dst`` is as it was. An existing ``dst`` is an error unless ``overwrite``; leftovers of
    killed runs are recovered first (:func:`prepare_destination`). Ctrl-C or SIGTERM during the swap or the
    cleanup is raised once they are done."""
    prepare_destination(dst, overwrite=overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with _interrupts() as interrupts:
        tmp, old = _sibling(dst, STAGING), None
        os.mkdir(tmp)
        try:
            yield tmp
            interrupts.holding = True
            if overwrite and os.path.lexists(dst):
                old = _sibling(dst, OLD)
                os.rename(dst, old)
            os.rename(tmp, dst)
        finally:
            interrupts.holding = True
            if old and os.path.lexists(old):  # the old copy goes back if the new one did not go in
                _settle_old(old, dst)
            if os.path.lexists(tmp):
                _remove(tmp)
        interrupts.release()  # one that came during the swap: the new output is in, and the run still stops


def byte_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (shows bytes/s); disabled: a bar that prints nothing."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def copy_side_files(src: str, dst: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy config, tokenizer, processor and generation files (every file but weights, the index and
    ``exclude``)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) and name not in (INDEX, *exclude):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
