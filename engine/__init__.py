"""The vitrine query engine: gRPC VisualSearch server, search over an index version, the client.

Modules: `types` (plain request/result dataclasses), `convert` (protobuf <-> plain types),
`errors` (domain errors and their gRPC status codes), `search` (the Searcher), `server`
(create_server / serve), `client` (VisualSearchClient); remote shard mode: `remote` (a root's
fan-out to shard servers) and `shard_server` (a shard server), sharing `lifecycle` with `server`.
"""
