"""The `vitrine` command line: parses arguments and wires model, indexer and engine together."""

__version__ = "0.1.0"
