"""Publishing a model folder: built beside its target, swapped in whole, never deleting what is not ours.

The converter writes into ``.<name>.partial-<random>`` next to the target and renames it into
place at the very end, so a failed or interrupted run leaves nothing half-written under the
target's name. Three rules keep ``--overwrite`` from losing data:

- only an empty folder or one of our converted models (``replaceable``) is ever replaced, and
  never a folder that holds the release being converted (``check_target``);
- the final swap re-checks both at the moment of the swap (``publish``): a folder that appeared
  while converting is replaced only with ``overwrite`` and only if it is ours;
- every working folder (partial, or an old model moved aside) is ``flock``-ed by the process
  that owns it, so ``remove_stale`` deletes only folders of dead runs: two conversions of the
  same target may run at once, and neither removes the other's work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from .errors import CheckpointError
from .untrusted_files import read_json

CONFIG_FILE = "config.json"
# What a converted model folder holds (loading.save_model writes these names, nothing else).
_OUR_FILES = re.compile(
    r"config\.json|tekken\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
)
VOICES_DIR = "voices"


class FolderError(OSError):
    """The output folder cannot be written or replaced; the message names the user's path."""

    def __str__(self) -> str:
        return self.args[0] if self.args else super().__str__()


def partial_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-"


def old_prefix(dst: Path) -> str:
    return f".{dst.name}.old-"


def replaceable(folder: Path) -> str | None:
    """None if ``folder`` may be replaced (empty, or a converted voxtral_tts model); else why not."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    if not entries:
        return None
    try:
        model_type = read_json(folder / CONFIG_FILE).get("model_type")
    except CheckpointError:
        model_type = None
    if model_type != "voxtral_tts":
        return f"it is not a converted model (no {CONFIG_FILE} with model_type voxtral_tts)"
    foreign = [n for n in entries if not (_OUR_FILES.fullmatch(n) or n == VOICES_DIR)]
    voices = folder / VOICES_DIR
    if voices.is_symlink() or (voices.exists() and not voices.is_dir()):
        foreign.append(VOICES_DIR)
    elif voices.is_dir():
        foreign += [f"{VOICES_DIR}/{n}" for n in sorted(os.listdir(voices)) if not n.endswith(".safetensors")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        return f"it holds files a converted model does not ({shown})"
    return None


def check_target(dst: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, a target that cannot be written or must not be replaced.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is off.
        FolderError: a parent of ``dst`` is a file; ``dst`` is a file, a link, or a folder that
            is not ours; ``dst`` holds one of ``sources`` or lies inside one.
    """
    for parent in dst.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise FolderError(f"{dst}: {parent} is a file, not a folder; choose another output path")
            break
    real = dst.resolve()
    for src in sources:
        src_real = src.resolve()
        if src_real == real:
            raise FolderError(f"{dst}: it is the source folder itself; write the model somewhere else")
        if real in src_real.parents:
            raise FolderError(f"{dst}: the source {src} is inside it; replacing it would delete the source")
        if src_real in real.parents:
            raise FolderError(f"{dst}: it lies inside the source {src}; write the model somewhere else")
    if not (dst.exists() or dst.is_symlink()):
        return
    if dst.is_symlink() or not dst.is_dir():
        kind = "a symbolic link" if dst.is_symlink() else "a file"
        raise FolderError(f"{dst}: it is {kind}, not a model folder; only a folder can be replaced")
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another --mlx-path or pass --overwrite")
    reason = replaceable(dst)
    if reason:
        raise FolderError(f"{dst}: --overwrite refused: {reason}; remove it yourself or choose another path")


class LockedFolder:
    """An exclusive ``flock`` on a folder, held while this process works in it.

    The lock lives on the folder itself (no lock file left behind) and follows it through
    renames; the kernel drops it when the process dies, which is how ``remove_stale`` tells a
    dead run's folder from a live one.
    """

    def __init__(self, path: Path, wait_s: float = 0.0):
        """Lock ``path``, polling up to ``wait_s`` seconds; BlockingIOError if it stays locked."""
        self.fd = os.open(path, os.O_RDONLY)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def make_partial(dst: Path) -> tuple[Path, LockedFolder]:
    """A new, locked ``.<name>.partial-<random>`` folder beside ``dst``.

    Made with ``mkdir`` (not ``mkdtemp``, which forces mode 0700), so the published folder has
    the permissions the umask gives, readable by a service account like any other folder.
    """
    for _ in range(100):
        tmp = dst.parent / f"{partial_prefix(dst)}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        except OSError as e:
            raise FolderError(f"{dst}: cannot create the model folder in {dst.parent} ({e.strerror})") from None
        return tmp, LockedFolder(tmp)
    raise FolderError(f"{dst}: cannot find a free temporary name in {dst.parent}")


def remove_stale(dst: Path, started_ns: int) -> list[Path]:
    """Remove the partial and moved-aside folders that earlier, killed runs left beside ``dst``.

    Only folders changed before this run started (``started_ns``, from ``time.time_ns()``) and
    not locked by a live process: a concurrent conversion's folders are left alone. Returns the
    folders removed.
    """
    removed = []
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith((partial_prefix(dst), old_prefix(dst))):
            continue
        path = dst.parent / name
        try:
            st = path.lstat()
            if not path.is_dir() or path.is_symlink() or st.st_ctime_ns >= started_ns:
                continue
            lock = LockedFolder(path)
        except OSError:  # locked by a live run (BlockingIOError), or gone already
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
        removed.append(path)
    return removed


def publish(tmp: Path, dst: Path, overwrite: bool, attempts: int = 3) -> None:
    """Rename the finished folder ``tmp`` to ``dst``, replacing an old model only with ``overwrite``.

    A folder that appeared at ``dst`` while converting is re-checked here: without
    ``overwrite`` the swap is refused (the other folder stays); with it, it is replaced only if
    ``replaceable``. The old folder is moved aside (locked) and deleted after the swap, or put
    back if the swap fails. Against a concurrent writer the swap is retried: the last one wins.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is off.
        FolderError: ``dst`` became something that must not be replaced, or the rename failed.
    """
    for _ in range(attempts):
        try:
            os.rename(tmp, dst)  # atomic; replaces at most an empty folder
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FolderError(f"{dst}: cannot move the converted model into place ({e.strerror})") from None
        if not overwrite:
            raise FileExistsError(f"{dst} appeared while converting (another conversion?); "
                                  "it was left as it is; pass --overwrite to replace it")
        check_target(dst, overwrite=True)  # what is there now must be ours
        _swap_old(tmp, dst)
        if not tmp.exists():
            return
    raise FolderError(f"{dst}: other processes kept replacing it; try again")


def _swap_old(tmp: Path, dst: Path) -> None:
    """Move ``dst`` aside, put ``tmp`` in its place and delete the old one; or put it back."""
    try:
        lock = LockedFolder(dst, wait_s=10.0)  # a writer that just published holds it a moment
    except FileNotFoundError:
        return  # gone meanwhile: the caller retries the plain rename
    except BlockingIOError:
        raise FolderError(f"{dst}: another process is replacing it right now; try again") from None
    old = dst.parent / f"{old_prefix(dst)}{secrets.token_hex(4)}"
    try:
        try:
            os.rename(dst, old)
        except FileNotFoundError:
            return
        reason = replaceable(old)  # what was moved is what counts, not what was checked before
        if reason is None:
            with contextlib.suppress(OSError):
                os.rename(tmp, dst)
            if not tmp.exists():
                shutil.rmtree(old, ignore_errors=True)  # swapped: the old model goes
                return
        try:
            os.rename(old, dst)  # not swapped: put the old folder back
        except OSError:
            if reason is not None:  # never delete it: say where it is
                raise FolderError(f"{dst}: --overwrite refused: {reason}; it was moved to {old}") from None
            shutil.rmtree(old, ignore_errors=True)  # ours, and already replaced by another writer
        if reason is not None:
            raise FolderError(f"{dst}: --overwrite refused: {reason}")
    finally:
        lock.release()
