"""Generated protobuf/gRPC modules of the vitrine API (see protos/vitrine/v1/*.proto)."""
