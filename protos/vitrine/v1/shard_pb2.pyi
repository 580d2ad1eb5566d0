from protos.vitrine.v1 import search_pb2 as _search_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardSearchRequest(_message.Message):
    __slots__ = ("queries", "k", "nprobe", "filter", "index_version")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[_search_pb2.Vector]
    k: int
    nprobe: int
    filter: _search_pb2.Filter
    index_version: str
    def __init__(self, queries: _Optional[_Iterable[_Union[_search_pb2.Vector, _Mapping]]] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., filter: _Optional[_Union[_search_pb2.Filter, _Mapping]] = ..., index_version: _Optional[str] = ...) -> None: ...

class ShardCandidates(_message.Message):
    __slots__ = ("shard", "k", "scores", "ids")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    k: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shard: _Optional[int] = ..., k: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardSearchResponse(_message.Message):
    __slots__ = ("candidates", "shards", "index_version", "took_us")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOOK_US_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[ShardCandidates]
    shards: _containers.RepeatedScalarFieldContainer[int]
    index_version: str
    took_us: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[ShardCandidates, _Mapping]]] = ..., shards: _Optional[_Iterable[int]] = ..., index_version: _Optional[str] = ..., took_us: _Optional[int] = ...) -> None: ...
