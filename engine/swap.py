"""Hot swap of the served index version: leases on the live Searcher and a watcher of CURRENT.

Every request takes a *lease* on the Searcher in service for its whole duration. `install` puts a
new Searcher in service atomically (new requests see it at once) and retires the old one: its
version is closed by the last request still holding a lease on it (or at once when there is none),
so in-flight requests finish on the version they started on, and nothing of it stays in memory.

A slot made with `keep_previous=True` (a shard server's) keeps the version it swapped away from
open until the next swap, and leases it to requests that name it: a root still on the previous
version keeps getting whole answers while the shard servers and the root swap one after the other.

`VersionWatcher` polls `<index_root>/CURRENT`; when it names another version, the watcher opens it
in the background, checks its model fingerprint against the server's model (a mismatch is refused
and logged; the old version keeps serving), warms it up and installs it. A loader may also *defer*
a swap (SwapDeferred: a root whose shard servers do not serve the new version yet); the watcher
then tries again at the next poll, and the old version keeps serving meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from engine.errors import NotReady
from indexer.version import CURRENT, IndexVersion, VersionError, read_current

logger = logging.getLogger("vitrine.engine")


class SwapDeferred(Exception):
    """Raised by a VersionWatcher's loader when the new version cannot be served yet (retried next poll)."""


class Served(Protocol):
    """What a slot holds: an object serving one index version (a Searcher, or a shard server's ShardSearch)."""

    version: IndexVersion


S = TypeVar("S", bound=Served)


class _Entry(Generic[S]):
    """A Searcher with its lease count and whether it was retired."""

    def __init__(self, searcher: S) -> None:
        self.searcher = searcher
        self.leases = 0
        self.retired = False


class SearcherSlot(Generic[S]):
    """Holds the Searcher in service; leases keep a retired one open until its last request ends.

    keep_previous: keep the Searcher replaced by the last `install` open (until the next one) and
    lease it to requests naming its version.
    """

    def __init__(self, keep_previous: bool = False) -> None:
        self._entry: _Entry[S] | None = None
        self._previous: _Entry[S] | None = None
        self._closing: list[_Entry[S]] = []  # retired, still leased: open until their last request ends
        self.keep_previous = keep_previous
        self._lock = threading.Lock()
        self.closed_versions = 0  # versions closed after retirement (tests and metrics read it)

    @contextlib.contextmanager
    def lease(self, version: str | None = None) -> Iterator[S]:
        """The Searcher in service, held open until the block ends; NotReady when there is none.

        version: a request naming the kept previous version leases that one instead (otherwise
        the one in service: the caller compares names and refuses a mismatch).
        """
        with self._lock:
            entry, previous = self._entry, self._previous
            if (version and previous is not None and previous.searcher.version.name == version
                    and (entry is None or entry.searcher.version.name != version)):
                entry = previous
            if entry is None:
                raise NotReady("the server is still loading its index and model (or shutting down); "
                               "retry in a few seconds")
            entry.leases += 1
        try:
            yield entry.searcher
        finally:
            with self._lock:
                entry.leases -= 1
                close = entry.retired and entry.leases == 0
            if close:
                self._close(entry)
                with self._lock:  # only once closed: then it can be opened again
                    if entry in self._closing:
                        self._closing.remove(entry)

    @property
    def current(self) -> S | None:
        """The Searcher in service (no lease: only for reading its name)."""
        entry = self._entry
        return None if entry is None else entry.searcher

    @property
    def previous(self) -> S | None:
        """The kept previous Searcher (keep_previous slots only; no lease: only for reading its name)."""
        entry = self._previous
        return None if entry is None else entry.searcher

    def install(self, searcher: S | None) -> None:
        """Put `searcher` in service (None: none) and retire the previous one (kept: the one before it).

        `searcher` may be the kept previous one (a rollback): it is served again and the one in service is
        kept in its place; nothing is retired.
        """
        with self._lock:
            if searcher is not None and self._previous is not None and self._previous.searcher is searcher:
                self._entry, self._previous = self._previous, self._entry
                return
            old, self._entry = self._entry, (None if searcher is None else _Entry(searcher))
            if self.keep_previous and searcher is not None:
                retiring, self._previous = [self._previous], old
            else:
                retiring, self._previous = [old, self._previous], None
            closing = []
            for entry in retiring:
                if entry is not None:
                    entry.retired = True
                    if entry.leases == 0:
                        closing.append(entry)
                    else:
                        self._closing.append(entry)
        for entry in closing:
            self._close(entry)

    def closing(self, name: str) -> bool:
        """True while a retired version named `name` is still open for requests in flight."""
        with self._lock:
            return any(entry.searcher.version.name == name for entry in self._closing)

    def _close(self, entry: _Entry[S]) -> None:
        logger.info("closing retired index version %s", entry.searcher.version.name)
        entry.searcher.version.close()
        self.closed_versions += 1


class VersionWatcher(Generic[S]):
    """Polls CURRENT every `poll_s` and calls `load(name) -> Searcher` + `install` when it changes.

    `load` raises to refuse a version (model mismatch, corrupt files, failed warm-up): the error is
    logged once per version name and the served version stays. A refused version is tried again only when
    CURRENT is published anew naming it (`vitrine index rollback --to <name>` once its files are repaired),
    not at every poll. `load` raising SwapDeferred puts the
    swap off to the next poll (logged and counted once per version name).
    """

    def __init__(self, index_root: Path, slot: SearcherSlot[S], load: Callable[[str], S], poll_s: float,
                 on_result: Callable[[str], None] | None = None) -> None:
        self.index_root = index_root
        self.slot = slot
        self.load = load
        self.poll_s = poll_s
        self.on_result = on_result or (lambda result: None)
        self.refused: dict[str, str] = {}  # version name -> why it was refused
        self.refused_at: dict[str, tuple[int, int] | None] = {}  # version name -> CURRENT's stamp when refused
        self.deferred: dict[str, str] = {}  # version name -> why its swap waits (until it happens)
        self.unreadable: str | None = None  # why CURRENT could not be read at the last poll (None: it could)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitrine-watcher", daemon=True)

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread.start()

    def check_once(self) -> str:
        """Read CURRENT once and swap when it names a new loadable version; returns what happened."""
        try:
            name = read_current(self.index_root)
        except VersionError as exc:
            if str(exc) != self.unreadable:  # once per reason, not at every poll
                logger.warning("cannot read CURRENT: %s (still serving %s; logged again when the reason changes)",
                               exc, served.version.name if (served := self.slot.current) else "nothing")
                self.unreadable = str(exc)
            return "unreadable"
        if self.unreadable is not None:
            logger.info("CURRENT is readable again: it names %s", name)
            self.unreadable = None
        current = self.slot.current
        if current is not None and current.version.name == name:
            return "unchanged"
        if name in self.refused:
            if self.refused_at.get(name) == self._current_stamp():
                return "unchanged"
            # CURRENT was written again naming it (`vitrine index rollback --to <name>` after its files were
            # repaired): an operator's explicit request to try it once more
            logger.info("CURRENT was published again naming refused index version %s; trying it again", name)
            del self.refused[name]
        if name not in self.deferred:
            logger.info("CURRENT names %s; loading it in the background", name)
        try:
            if self.slot.closing(name):  # a rollback to it: it can be opened again once it closed
                raise SwapDeferred(f"index version {name} is still open for requests in flight; it is loaded "
                                   "again once they finished")
            searcher = self.load(name)
        except SwapDeferred as exc:
            if name not in self.deferred:
                logger.info("index version %s waits, still serving %s: %s", name,
                            current.version.name if current else "nothing", exc)
                self.on_result("deferred")
            self.deferred[name] = str(exc)
            return "deferred"
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version and keeps the old one
            self.refused[name] = str(exc)
            self.refused_at[name] = self._current_stamp()
            logger.error("refused index version %s, still serving %s: %s", name,
                         current.version.name if current else "nothing", exc)
            self.on_result("refused")
            return "refused"
        self.slot.install(searcher)
        self.deferred.pop(name, None)
        logger.info("swapped to index version %s (%s, %d vectors)", name, searcher.version.factory,
                    searcher.version.count)
        self.on_result("swapped")
        return "swapped"

    def _current_stamp(self) -> tuple[int, int] | None:
        """(inode, mtime) of CURRENT: each publish replaces the file, so a new stamp is a new publish."""
        try:
            stat = (self.index_root / CURRENT).stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                logger.exception("the index watcher failed; retrying at the next poll")
                self.on_result("failed")

    def stop(self) -> None:
        """Stop polling (waits for a load in progress)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
