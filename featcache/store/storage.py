"""Where store bytes go: fsspec URLs, atomic local writes, and temp files that name their writer.

Every local file featcache writes (feature shards, markers, and through ``WriterLocalStore``
every chunk and ``zarr.json`` that zarr writes for it) goes to a temp file beside its target,
then ``os.replace`` (or ``os.link`` for exclusive creates). The temp file's name says who wrote
it::

    <target>.fc-<pid>-<host hash>-<sequence>.partial

so a writer cleaning up after a killed one removes only temp files whose writer is provably
gone: written on this host by a process id that no longer exists. A live writer's temp files
(another ``--shard I/N`` process, a Dask worker, a slow rename on network storage) are never
touched. A recycled pid only makes a dead writer look alive (its temp files stay): the safe side.
Zarr's own temp files (``<target stem>.<32 hex uuid>.partial``, written by plain zarr, e.g. a
user's ``zarr.open_group(store, mode="r+")``) carry no writer, so they are removed only once
older than ``ZARR_TEMP_GRACE_S``. Object stores (``s3://``) need none of this: a PUT is atomic.

Durability follows the rule SQLite and LMDB use: the data, then the file, then the folder
holding its name, then the commit record, then the commit record's folder. A name (a rename
into place, a new folder) is on disk only once the folder holding it is fsynced after it. So
``sync_files`` fsyncs files and then every folder from theirs up to a given root (a store's
metadata at its creation; a shard's objects before its marker), and ``write_atomic(sync=True)``
makes one file durable on return (a marker, a run dir's checkpoint): the temp file fsynced, the
rename, then its folder and the folder above each folder it had to make. After a machine crash
a marker never names data, metadata or a folder that did not reach the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterable

import fsspec
import zarr
from zarr.core.buffer import Buffer

__all__ = [
    "TEMP_SUFFIX",
    "ZARR_TEMP_GRACE_S",
    "WriterLocalStore",
    "existing_ancestor",
    "fs_and_path",
    "is_local",
    "remove_stale_partials",
    "sync_files",
    "write_atomic",
    "zarr_store",
]

ZARR_TEMP_GRACE_S = 900.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SEQUENCE = itertools.count()
# the suffix of our temp files (pid, host hash, sequence), as a regex others may match names by
TEMP_SUFFIX = r"\.fc-(\d+)-([0-9a-f]{8})-\d+\.partial"
_OURS = re.compile(TEMP_SUFFIX + "$")
_ZARRS = re.compile(r"\.[0-9a-f]{32}\.partial$")


def fs_and_path(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path without protocol or trailing slash) of ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _temp_name(path: str) -> str:
    return f"{path}.fc-{os.getpid()}-{_HOST}-{next(_SEQUENCE)}.partial"


def write_atomic(
    path: str, parts: Iterable[bytes | memoryview], *, exclusive: bool = False, sync: bool = False
) -> None:
    """Write ``parts`` to local ``path`` through a temp file naming this writer, then rename.

    The file follows the umask, as ``open`` makes it. ``exclusive``: fail with
    ``FileExistsError`` if ``path`` exists (a hard link never overwrites). ``sync``: durable on
    return: the temp file is fsynced before the rename, then ``path``'s folder, then the folder
    above each folder made for it (a marker or a checkpoint must not outlive its data on a
    crash, nor vanish once reported written). A failure removes the temp file and raises.
    """
    folder = os.path.dirname(path)
    made = _make_folders(folder)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.writelines(parts)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)
            os.remove(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if sync:
        for name in [folder, *(os.path.dirname(new) for new in reversed(made))]:
            _fsync_path(name)


def _make_folders(folder: str) -> list[str]:
    """Make ``folder`` and its missing parents; return those found missing, outermost first
    (made by this call or by a racing writer: either way their names need an fsync)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if missing:
        os.makedirs(missing[0], exist_ok=True)
    return missing[::-1]


def existing_ancestor(path: str) -> str:
    """The deepest folder above local ``path`` that exists: every folder below it on the way
    to ``path`` is new, and its name is durable once this folder is fsynced."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def sync_files(paths: Iterable[str], root: str) -> None:
    """fsync each local file of ``paths``, then every folder from the one holding it up to and
    including ``root`` (an ancestor of each), deepest first, each once: the files' bytes and
    every name on the way to them (new folders included) are then on disk."""
    root = os.path.abspath(root)
    folders: dict[str, None] = {}
    for path in paths:
        _fsync_path(path)
        folder = os.path.dirname(os.path.abspath(path))
        while folder not in folders:
            folders[folder] = None
            if folder == root or folder == os.path.dirname(folder):
                break
            folder = os.path.dirname(folder)
    for folder in sorted(folders, key=lambda name: -name.count(os.sep)):
        _fsync_path(folder)


def _fsync_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class WriterLocalStore(zarr.storage.LocalStore):
    """zarr's ``LocalStore`` whose writes go through ``write_atomic`` (temp files that name
    their writer); reads, listings and deletes are zarr's own."""

    def _target(self, key: str, value: Buffer) -> str:
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"Expected a zarr Buffer for {key!r}. Got {type(value)} instead.")
        return os.path.join(str(self.root), *key.split("/"))

    async def set(self, key: str, value: Buffer) -> None:
        if not self._is_open:
            await self._open()
        await asyncio.to_thread(write_atomic, self._target(key, value), [value.as_buffer_like()])

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not self._is_open:
            await self._open()
        path = self._target(key, value)
        with contextlib.suppress(FileExistsError):
            await asyncio.to_thread(write_atomic, path, [value.as_buffer_like()], exclusive=True)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._ensure_open_sync()
        write_atomic(self._target(key, value), [value.as_buffer_like()])


def zarr_store(url: str, storage_options: dict | None, read_only: bool):
    """The zarr store object for ``url``: ``WriterLocalStore`` locally, else fsspec's."""
    fs, path = fs_and_path(url, storage_options)
    if is_local(fs):
        return WriterLocalStore(path, read_only=read_only)
    store = zarr.storage.FsspecStore.from_url(
        url, storage_options=storage_options or None, read_only=read_only
    )
    # fsspec reuses one filesystem instance per protocol and options, with its listings cache:
    # listings from before this store was removed or re-created in this process would hide or
    # invent members (group.arrays()). Every open starts from fresh listings.
    store.fs.invalidate_cache()
    return store


def _writer_gone(pid: int, host: str) -> bool:
    """True only when the writer provably no longer runs: this host, and no such process."""
    if host != _HOST or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def remove_stale_partials(
    directories: Iterable[str],
    *,
    zarr_grace_s: float = ZARR_TEMP_GRACE_S,
    targets: Callable[[str], bool] | None = None,
) -> list[str]:
    """Delete temp files directly in local ``directories`` left by writers that are gone.

    Ours go when their writer is provably gone (module doc); zarr's once older than
    ``zarr_grace_s`` seconds; any other ``.partial`` file is not ours to judge and stays.
    ``targets``: only temp files whose target's name (the file name less the temp suffix) it
    accepts are considered (a run dir's own files, not a user's). Returns the removed paths.
    Directories are scanned one level deep, so the caller bounds the work (a shard's
    directories, not the whole store).
    """
    removed, now = [], time.time()
    for directory in directories:
        try:
            entries = [e for e in os.scandir(directory) if e.name.endswith(".partial")]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            ours = _OURS.search(entry.name)
            suffix = ours or _ZARRS.search(entry.name)
            if targets is not None and not (suffix and targets(entry.name[: suffix.start()])):
                continue
            try:
                if ours:
                    stale = _writer_gone(int(ours.group(1)), ours.group(2))
                else:
                    old = now - entry.stat().st_mtime >= zarr_grace_s
                    stale = bool(_ZARRS.search(entry.name)) and old
                if stale:
                    os.remove(entry.path)
                    removed.append(entry.path)
            except FileNotFoundError:  # removed meanwhile (renamed into place, or cleaned)
                continue
    return removed
