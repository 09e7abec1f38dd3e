"""Where a study lives: ``<storage>/<study name>/``, a local folder or a pyarrow URI (s3://, gs://, ...).

Ray Tune and Ray Train write their own files there (through pyarrow). The driver's own outputs
(``results.csv``, ``tensorboard/``, ``study.json``, ``results.md``) are written to a local folder first:
the study folder itself when storage is local, else a staging folder on the driver
(``$MOREID_CACHE/studies/<name>``) that is copied to the URI after every rewrite.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pyarrow.fs as pafs

from reid_core.files import write_atomic

DEFAULT_STORAGE = "studies"
# What --resume unpickles from a study folder: Tune's tuner.pkl, the searcher's state (searcher-state-*.pkl)
# and Tune's experiment state (experiment_state-*.json holds pickled trials).
UNPICKLED_ON_RESUME = ("*.pkl", "experiment_state*.json")


class StorageError(ValueError):
    """A storage root that cannot hold studies; the message names it."""


def is_uri(path: str) -> bool:
    return "://" in path


def cache_root() -> Path:
    return Path(os.environ.get("MOREID_CACHE") or Path.home() / ".cache" / "moreid")


class StudyStorage:
    """The study folder ``<root>/<name>`` (``uri``) and the local folder the driver writes (``local``)."""

    def __init__(self, root: str | os.PathLike, name: str) -> None:
        root = os.fspath(root)
        self.name = name
        self.remote = is_uri(root)
        if self.remote:
            self.root = root.rstrip("/")
            self.uri = f"{self.root}/{name}"
            self.local = cache_root() / "studies" / name
            self._resolved: tuple[pafs.FileSystem, str] | None = None  # resolved on first use (may wait on the network)
        else:
            self.root = str(Path(root).expanduser().resolve())
            self.uri = str(Path(self.root) / name)
            self.local = Path(self.uri)
            self._resolved = None

    @property
    def _fs(self) -> pafs.FileSystem:
        if self._resolved is None:
            self._resolved = pafs.FileSystem.from_uri(self.uri)
        return self._resolved[0]

    @property
    def _fs_path(self) -> str:
        self._fs  # noqa: B018 (resolves)
        return self._resolved[1]

    def check_reachable(self, timeout_s: float) -> None:
        """Raise :class:`StorageError` naming the URI when its filesystem does not answer within
        ``timeout_s`` seconds or refuses (no network, unknown bucket, missing credentials)."""
        outcome: list[BaseException | None] = []

        def probe() -> None:
            try:
                self._fs.get_file_info(self._fs_path)
                outcome.append(None)
            except BaseException as exc:  # reported below, in the caller's thread
                outcome.append(exc)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if not outcome:
            raise StorageError(f"--storage {self.root}: no answer within {timeout_s:g} s (no network?)")
        if outcome[0] is not None:
            lines = [line for line in str(outcome[0]).splitlines() if line.strip()] or [type(outcome[0]).__name__]
            raise StorageError(f"--storage {self.root}: cannot reach it: {lines[0].strip()}")

    def check_private(self, patterns: tuple[str, ...] = UNPICKLED_ON_RESUME) -> None:
        """Raise :class:`StorageError` naming the first of the study folder and its files matching
        ``patterns`` that another user owns or could have written (group- or world-writable): they are
        unpickled on --resume, and a pickle runs code. (A URI's objects have no owner to check here: their
        access is the bucket's policy.)"""
        if self.remote:
            return
        paths = [self.local, *sorted({p for pattern in patterns for p in self.local.glob(pattern)})]
        for path in paths:
            info = path.stat()  # follows a link: what would be read
            if info.st_uid != os.getuid():
                raise StorageError(f"{path} belongs to another user (uid {info.st_uid}): --resume would unpickle "
                                   f"what it holds; resume only a study this user wrote")
            if info.st_mode & 0o022:
                raise StorageError(f"{path} is writable by other users (mode {info.st_mode & 0o777:o}): --resume "
                                   f"would unpickle what it holds; check it, then chmod go-w it")

    def exists(self) -> bool:
        """Whether the study folder exists (locally, or at the URI)."""
        if not self.remote:
            return self.local.exists()
        return self._fs.get_file_info(self._fs_path).type != pafs.FileType.NotFound

    def remove(self) -> None:
        """Delete the study folder (and the driver's local copy of a remote one)."""
        if self.remote:
            self._fs.delete_dir(self._fs_path)
        shutil.rmtree(self.local, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """Local path of a driver output."""
        return self.local / relative

    def location(self, relative: str = "") -> str:
        """Where a driver output lies for the user (URI when remote)."""
        base = self.uri if self.remote else str(self.local)
        return f"{base}/{relative}" if relative else base

    def write_text(self, relative: str, text: str) -> Path:
        """Write a driver file atomically (temporary file + rename), then copy it to the URI if remote."""
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda fh: fh.write(text.encode("utf-8")))
        self.upload(relative)
        return target

    def upload(self, relative: str) -> None:
        """Copy a local driver file or folder to the study URI (no-op for local storage). A file is
        written to a temporary name and moved, so readers of the URI never see half a file where the
        filesystem supports moves."""
        if not self.remote:
            return
        source = self.path(relative)
        dest = f"{self._fs_path}/{relative}"
        if source.is_dir():
            self._fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(source), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self._fs)
            return
        self._fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        tmp = f"{dest}.tmp"
        with self._fs.open_output_stream(tmp) as out:
            out.write(source.read_bytes())
        try:
            self._fs.move(tmp, dest)
        except (OSError, NotImplementedError):  # object stores without rename: overwrite in place
            with self._fs.open_output_stream(dest) as out:
                out.write(source.read_bytes())
            self._fs.delete_file(tmp)

    def read_text(self, relative: str) -> str | None:
        """A driver file's text (from the URI when remote), or None when it does not exist."""
        if not self.remote:
            path = self.path(relative)
            return path.read_text(encoding="utf-8") if path.is_file() else None
        dest = f"{self._fs_path}/{relative}"
        if self._fs.get_file_info(dest).type != pafs.FileType.File:
            return None
        with self._fs.open_input_stream(dest) as fh:
            return fh.read().decode("utf-8")
