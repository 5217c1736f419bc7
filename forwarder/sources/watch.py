"""Wake the file source when a watched folder changes (Linux inotify, through asyncinotify).

A file that is created and rotated away between two timer scans must still be found:
dockerd at a few thousand lines a second fills a 50 KB file in well under a second and
deletes the oldest copy soon after. So the file source watches the folders its globs
can match in (entries created, renamed in or out, deleted) and scans again at once; the
timer (`glob_interval_s`) stays as the fallback and for what inotify does not report
(network filesystems, a folder appearing deeper than the globs' fixed prefix).

Where inotify cannot be used (not Linux, no instance left, the watch limit reached) the
watcher says so once and the source scans on its timer alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

try:
    from asyncinotify import Inotify, Mask, Watch
except (ImportError, OSError):  # not Linux: no libc inotify
    Inotify = Mask = Watch = None  # type: ignore[assignment,misc]

FOLDER_EVENTS = (
    (Mask.CREATE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.ONLYDIR)
    if Mask is not None
    else 0
)
NEW_ENTRY = (Mask.CREATE | Mask.MOVED_TO) if Mask is not None else 0
MAX_WATCHES = 8192  # folders; beyond it the timer alone finds new files (logged once)


class FolderWatcher:
    """Folders to watch in, changes out: `watch(folders)`, `take()`, `readable()`."""

    def __init__(self, log_extra: Mapping[str, Any]) -> None:
        self._log_extra = dict(log_extra)
        self._watches: dict[str, Any] = {}  # folder -> asyncinotify Watch
        self._inotify: Any = None
        self._warned = False
        self.created: set[str] = set()  # paths of entries created or renamed in since take()
        if Inotify is None:
            self._unavailable("inotify is not available on this system")
            return
        try:
            # sync_timeout=0: sync_get answers None at once when nothing is queued. And
            # O_NONBLOCK set here: asyncinotify 4.4's InitFlags.NONBLOCK is O_CLOEXEC.
            self._inotify = Inotify(sync_timeout=0)
            os.set_blocking(self._inotify.fd, False)
        except OSError as e:
            self._unavailable(f"inotify_init1: {e.strerror}")

    @property
    def available(self) -> bool:
        return self._inotify is not None

    @property
    def folders(self) -> int:
        return len(self._watches)

    def _unavailable(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.info(
                "not watching folders (%s): new files are found by the glob re-scan "
                "(glob_interval_s) alone",
                why,
                extra=self._log_extra,
            )

    def watch(self, folders: Iterable[str]) -> None:
        """Watch exactly these folders from now on (added and removed as needed)."""
        if self._inotify is None:
            return
        wanted = set(folders)
        for folder in list(self._watches):
            if folder not in wanted:
                watch = self._watches.pop(folder)
                try:
                    self._inotify.rm_watch(watch)
                except OSError:
                    pass  # the folder is gone: the kernel dropped the watch already
        for folder in sorted(wanted - self._watches.keys()):
            if len(self._watches) >= MAX_WATCHES:
                self._unavailable(f"more than {MAX_WATCHES} folders to watch")
                break
            try:
                self._watches[folder] = self._inotify.add_watch(folder, FOLDER_EVENTS)
            except OSError as e:
                if e.errno == 28:  # ENOSPC: fs.inotify.max_user_watches reached
                    self._unavailable("the inotify watch limit (fs.inotify.max_user_watches)")
                    break
                # gone already, or not a folder: the next scan decides again

    def take(self) -> bool:
        """Whether anything changed since the last call; adds new entries to `created`.

        Never blocks: reads the events the kernel has queued, if any."""
        if self._inotify is None:
            return False
        changed = False
        while True:
            try:
                event = self._inotify.sync_get()
            except BlockingIOError:
                return changed
            except OSError as e:
                self._unavailable(f"reading inotify events: {e.strerror}")
                self.close()
                return True
            if event is None:
                return changed
            changed = True
            if event.mask & NEW_ENTRY and event.path is not None:
                self.created.add(os.fspath(event.path))

    def readable(self) -> asyncio.Future[None] | None:
        """A future done when events are queued (None without inotify)."""
        if self._inotify is None:
            return None
        loop = asyncio.get_running_loop()
        fd = self._inotify.fd
        future: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(fd, ready)
        future.add_done_callback(lambda _: loop.remove_reader(fd))
        return future

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._watches.clear()
