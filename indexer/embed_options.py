"""The embed stage's choices, kept free of numpy and torch so the CLI can offer them without loading either.

`indexer.embed` explains each; `EmbedSettings` checks against these, the CLI and benchmarks offer them.
"""

BACKENDS = ("local", "ray")  # "local": DataLoader workers + this process's model; "ray": Ray Data actors
FORWARD_PLACES = ("auto", "main", "workers")  # where the forward pass runs (indexer.embed's docstring)
