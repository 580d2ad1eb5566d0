"""Catalog ingest into LMDB shards and the readers of those shards (records and a torch dataset)."""

from model.data.ingest import IngestReport, build_shards
from model.data.shards import (
    SHARDS_FORMAT,
    ShardDataset,
    ShardRecord,
    decode_record,
    encode_record,
    iter_shard_records,
    load_shards_manifest,
)

__all__ = ["SHARDS_FORMAT", "IngestReport", "ShardDataset", "ShardRecord", "build_shards", "decode_record",
           "encode_record", "iter_shard_records", "load_shards_manifest"]
