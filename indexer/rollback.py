"""Rolling the live index back to an earlier version.

A rollback only rewrites CURRENT, atomically, after the target version has been opened and its
checksums verified: a version that cannot serve never becomes live, and a failed rollback leaves
CURRENT as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from indexer.errors import VersionError
from indexer.version import list_versions, live_history, open_version, publish_current, read_current

log = logging.getLogger("vitrine.indexer")


def previous_version(root: str | Path) -> str:
    """The complete version that was live before the live one (see `_previous`)."""
    return _previous(list_versions(root), read_current(root), root)


def _previous(names: list[str], current: str, root: str | Path) -> str:
    """The version a plain rollback goes to: the newest one on <root>/HISTORY's stack below the live one that is
    still complete, so that after a rollback away from a bad version and a new publish, the next rollback returns
    to the good one rather than to the bad one that sorts before the new name. Without a history that ends
    at the live version (a root from before HISTORY, or CURRENT edited by hand): the version before it by name."""
    stack = live_history(root)
    if current in names and stack and stack[-1] == current:
        for name in reversed(stack[:-1]):
            if name in names:  # the stack holds each name once: never the live one below its top
                return name
    if current not in names:
        older = [name for name in names if name < current]
        hint = f"`vitrine index rollback --to {older[-1]}` (the newest complete version before it)" if older \
            else f"`vitrine index rollback --to NAME` with one of {names}" if names else "a new `vitrine index build`"
        raise VersionError(f"CURRENT names {current}, which is not a complete version under {root}; to serve "
                           f"again: {hint}")
    position = names.index(current)
    if position == 0:
        raise VersionError(f"{current} is the oldest version under {root}; there is nothing to roll back to")
    return names[position - 1]


def rollback(root: str | Path, to: str | None = None) -> str:
    """Make `to` (default: the version that was live before the live one) live again; returns its name.

    With `to`, a CURRENT that is missing or unreadable is replaced too (the target does not depend on it).
    """
    names = list_versions(root)
    if to is None:
        before = read_current(root)
        target = _previous(names, before, root)
    else:
        target = to
        try:
            before = read_current(root)
        except VersionError as exc:
            before = f"(unreadable: {exc})"
    if target not in names:
        raise VersionError(f"no complete version named {target!r} under {root}; see `vitrine index list`")
    with open_version(Path(root) / target, verify_checksums=True):
        pass  # it opens and every checksum matches: safe to serve
    publish_current(root, target, event="rollback")
    log.info("rolled back %s: CURRENT %s -> %s", root, before, target)
    return target
