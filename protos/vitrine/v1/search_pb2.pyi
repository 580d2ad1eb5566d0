import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_INNER_PRODUCT: _ClassVar[Metric]
    METRIC_L2: _ClassVar[Metric]
METRIC_UNSPECIFIED: Metric
METRIC_INNER_PRODUCT: Metric
METRIC_L2: Metric

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PriceRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("categories", "price", "in_stock_only", "brands")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_ONLY_FIELD_NUMBER: _ClassVar[int]
    BRANDS_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[str]
    price: PriceRange
    in_stock_only: bool
    brands: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, categories: _Optional[_Iterable[str]] = ..., price: _Optional[_Union[PriceRange, _Mapping]] = ..., in_stock_only: _Optional[bool] = ..., brands: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("nprobe", "exclude_query_product", "exact_rerank", "one_per_product")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_QUERY_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    EXACT_RERANK_FIELD_NUMBER: _ClassVar[int]
    ONE_PER_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    exclude_query_product: bool
    exact_rerank: bool
    one_per_product: bool
    def __init__(self, nprobe: _Optional[int] = ..., exclude_query_product: _Optional[bool] = ..., exact_rerank: _Optional[bool] = ..., one_per_product: _Optional[bool] = ...) -> None: ...

class Product(_message.Message):
    __slots__ = ("product_id", "title", "category", "brand", "price", "currency", "image_url", "in_stock", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    title: str
    category: str
    brand: str
    price: float
    currency: str
    image_url: str
    in_stock: bool
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., brand: _Optional[str] = ..., price: _Optional[float] = ..., currency: _Optional[str] = ..., image_url: _Optional[str] = ..., in_stock: _Optional[bool] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "vector", "product_id", "top_k", "filter", "options", "crop")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    vector: Vector
    product_id: str
    top_k: int
    filter: Filter
    options: SearchOptions
    crop: Region
    def __init__(self, image: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., product_id: _Optional[str] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., options: _Optional[_Union[SearchOptions, _Mapping]] = ..., crop: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("product_id", "score", "product")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    score: float
    product: Product
    def __init__(self, product_id: _Optional[str] = ..., score: _Optional[float] = ..., product: _Optional[_Union[Product, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "index_version", "took_us", "partial", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOOK_US_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    index_version: str
    took_us: int
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., index_version: _Optional[str] = ..., took_us: _Optional[int] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: SearchResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[SearchResponse, _Mapping]] = ...) -> None: ...

class BatchSearchResponse(_message.Message):
    __slots__ = ("results", "index_version", "took_us")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOOK_US_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchSearchResult]
    index_version: str
    took_us: int
    def __init__(self, results: _Optional[_Iterable[_Union[BatchSearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ..., took_us: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("image", "crop")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    crop: Region
    def __init__(self, image: _Optional[bytes] = ..., crop: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vector", "model_fingerprint", "took_us")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOOK_US_FIELD_NUMBER: _ClassVar[int]
    vector: Vector
    model_fingerprint: str
    took_us: int
    def __init__(self, vector: _Optional[_Union[Vector, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., took_us: _Optional[int] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetProductRequest(_message.Message):
    __slots__ = ("product_id",)
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    def __init__(self, product_id: _Optional[str] = ...) -> None: ...

class GetProductResponse(_message.Message):
    __slots__ = ("product", "index_version")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    product: Product
    index_version: str
    def __init__(self, product: _Optional[_Union[Product, _Mapping]] = ..., index_version: _Optional[str] = ...) -> None: ...

class GetIndexInfoResponse(_message.Message):
    __slots__ = ("version", "count", "dim", "factory", "model_fingerprint", "metric", "created_time", "shard_count", "default_nprobe", "query_image_width", "query_image_height")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NPROBE_FIELD_NUMBER: _ClassVar[int]
    QUERY_IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    QUERY_IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    count: int
    dim: int
    factory: str
    model_fingerprint: str
    metric: Metric
    created_time: _timestamp_pb2.Timestamp
    shard_count: int
    default_nprobe: int
    query_image_width: int
    query_image_height: int
    def __init__(self, version: _Optional[str] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., factory: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., metric: _Optional[_Union[Metric, str]] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shard_count: _Optional[int] = ..., default_nprobe: _Optional[int] = ..., query_image_width: _Optional[int] = ..., query_image_height: _Optional[int] = ...) -> None: ...
