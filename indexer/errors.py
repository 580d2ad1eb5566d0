"""Exceptions of the indexer, shared by its modules."""


class VersionError(Exception):
    """An index version (or CURRENT) is missing, incomplete, corrupt or of an unknown format.

    The message names the file and says what was wrong, so an operator can fix or rebuild it.
    """


class ValidationFailed(Exception):
    """A freshly built index failed validation; it was not written and CURRENT was not touched."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class StageError(RuntimeError):
    """A build stage cannot run: its inputs (an earlier stage's outputs) are missing, or another job holds the lock."""
