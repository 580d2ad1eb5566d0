"""vitrine indexer: the nightly index build and the on-disk index version format.

Modules: `plan` (index parameters from N and dim), `build` (embed -> train -> add -> validate ->
publish), `version` (write/open/publish an index version), `search` (search across shards and
merge), `store` (catalog LMDB, filter columns, file utilities), `errors`.

Importing this package imports nothing heavy; the engine imports `indexer.version` only.
"""
