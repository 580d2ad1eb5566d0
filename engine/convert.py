"""Conversions between the protobuf messages of vitrine.v1 and the plain types of engine.types.

Protobuf types stop here: the servicer converts requests on the way in and results on the way
out, and the client does the reverse. Every pair round-trips (tests/test_engine_convert.py).
"""

from __future__ import annotations

import datetime as dt

import grpc
import numpy as np

from engine.errors import InvalidQuery
from engine.types import (
    BatchItem,
    Embedding,
    IndexInfo,
    SearchFilter,
    SearchHit,
    SearchOptions,
    SearchQuery,
    SearchRequest,
    SearchResult,
    ShardAnswer,
    ShardPart,
    ShardQuery,
)
from model.catalog import Product
from protos.vitrine.v1 import search_pb2 as pb
from protos.vitrine.v1 import shard_pb2

_METRICS = {"inner_product": pb.METRIC_INNER_PRODUCT, "l2": pb.METRIC_L2}
_METRIC_NAMES = {code: name for name, code in _METRICS.items()}


def product_to_proto(product: Product) -> pb.Product:
    """A catalog Product as a protobuf Product (the `split` field is internal and not sent)."""
    message = pb.Product(product_id=product.product_id, title=product.title, category=product.category,
                         brand=product.brand, currency=product.currency, image_url=product.image_url,
                         in_stock=product.in_stock, attributes=dict(product.attributes))
    if product.price is not None:
        message.price = float(product.price)
    return message


def product_from_proto(message: pb.Product) -> Product:
    """A protobuf Product as a catalog Product (split None: it is not part of the API)."""
    return Product(product_id=message.product_id, title=message.title, category=message.category,
                   brand=message.brand, price=message.price if message.HasField("price") else None,
                   currency=message.currency, in_stock=message.in_stock, image_url=message.image_url,
                   attributes=dict(message.attributes), split=None)


def filter_to_proto(search_filter: SearchFilter) -> pb.Filter:
    """A SearchFilter as a protobuf Filter; the price range is set only when a bound is."""
    message = pb.Filter(categories=list(search_filter.categories), brands=list(search_filter.brands),
                        in_stock_only=search_filter.in_stock_only)
    if search_filter.min_price is not None:
        message.price.min = float(search_filter.min_price)
    if search_filter.max_price is not None:
        message.price.max = float(search_filter.max_price)
    return message


def filter_from_proto(message: pb.Filter) -> SearchFilter:
    """A protobuf Filter as a SearchFilter (unset price bounds are open)."""
    price = message.price
    return SearchFilter(categories=tuple(message.categories), brands=tuple(message.brands),
                        min_price=price.min if price.HasField("min") else None,
                        max_price=price.max if price.HasField("max") else None,
                        in_stock_only=message.in_stock_only)


def options_to_proto(options: SearchOptions) -> pb.SearchOptions:
    """SearchOptions as protobuf (nprobe None -> 0, the wire's "version default"; booleans always set)."""
    message = pb.SearchOptions(nprobe=options.nprobe or 0, exact_rerank=options.exact_rerank,
                               one_per_product=options.one_per_product)
    if options.exclude_query_product is not None:
        message.exclude_query_product = options.exclude_query_product
    return message


def options_from_proto(message: pb.SearchOptions) -> SearchOptions:
    """Protobuf SearchOptions as SearchOptions (nprobe 0 -> None; unset exclusion -> None; unset flags -> True)."""
    exclude = message.exclude_query_product if message.HasField("exclude_query_product") else None
    return SearchOptions(nprobe=message.nprobe or None, exclude_query_product=exclude,
                         exact_rerank=message.exact_rerank if message.HasField("exact_rerank") else True,
                         one_per_product=message.one_per_product if message.HasField("one_per_product") else True)


def query_to_proto(query: SearchQuery, message: pb.SearchRequest) -> None:
    """Set the `query` oneof of `message` from a SearchQuery (nothing set for an empty query)."""
    if query.crop is not None:
        message.crop.CopyFrom(region_to_proto(query.crop))
    if query.image is not None:
        message.image = query.image
    elif query.vector is not None:
        message.vector.values.extend(np.asarray(query.vector, dtype=np.float32).ravel().tolist())
    elif query.product_id is not None:
        message.product_id = query.product_id


def region_to_proto(region: tuple[float, float, float, float]) -> pb.Region:
    """(x, y, width, height) fractions as a protobuf Region."""
    x, y, width, height = region
    return pb.Region(x=x, y=y, width=width, height=height)


def region_from_proto(message: pb.SearchRequest | pb.EmbedRequest) -> tuple[float, float, float, float] | None:
    """The crop of a request as (x, y, width, height), None when unset."""
    if not message.HasField("crop"):
        return None
    return (message.crop.x, message.crop.y, message.crop.width, message.crop.height)


def query_from_proto(message: pb.SearchRequest) -> SearchQuery:
    """The query of a protobuf SearchRequest (an empty SearchQuery when the oneof is unset)."""
    which = message.WhichOneof("query")
    crop = region_from_proto(message)
    if which == "image":
        return SearchQuery(image=message.image, crop=crop)
    if which == "vector":
        return SearchQuery(vector=np.asarray(message.vector.values, dtype=np.float32), crop=crop)
    if which == "product_id":
        return SearchQuery(product_id=message.product_id, crop=crop)
    return SearchQuery(crop=crop)


def request_to_proto(request: SearchRequest) -> pb.SearchRequest:
    """A SearchRequest as protobuf (top_k None -> 0, the wire's "default")."""
    message = pb.SearchRequest(top_k=request.top_k or 0, filter=filter_to_proto(request.filter),
                               options=options_to_proto(request.options))
    query_to_proto(request.query, message)
    return message


def request_from_proto(message: pb.SearchRequest) -> SearchRequest:
    """A protobuf SearchRequest as a SearchRequest; validation is the Searcher's job."""
    return SearchRequest(query=query_from_proto(message), top_k=message.top_k or None,
                         filter=filter_from_proto(message.filter), options=options_from_proto(message.options))


def hit_to_proto(hit: SearchHit) -> pb.Hit:
    """A SearchHit as a protobuf Hit."""
    return pb.Hit(product_id=hit.product_id, score=hit.score, product=product_to_proto(hit.product))


def hit_from_proto(message: pb.Hit) -> SearchHit:
    """A protobuf Hit as a SearchHit."""
    return SearchHit(product_id=message.product_id, score=message.score, product=product_from_proto(message.product))


def result_to_proto(result: SearchResult) -> pb.SearchResponse:
    """A SearchResult as a protobuf SearchResponse."""
    return pb.SearchResponse(hits=[hit_to_proto(h) for h in result.hits], index_version=result.index_version,
                             took_us=result.took_us, partial=result.partial,
                             missing_shards=list(result.missing_shards))


def result_from_proto(message: pb.SearchResponse) -> SearchResult:
    """A protobuf SearchResponse as a SearchResult."""
    return SearchResult(hits=tuple(hit_from_proto(h) for h in message.hits), index_version=message.index_version,
                        took_us=message.took_us, missing_shards=tuple(message.missing_shards))


def index_info_to_proto(info: IndexInfo) -> pb.GetIndexInfoResponse:
    """IndexInfo as a protobuf GetIndexInfoResponse (an unknown metric name becomes METRIC_UNSPECIFIED)."""
    message = pb.GetIndexInfoResponse(version=info.version, count=info.count, dim=info.dim, factory=info.factory,
                                      model_fingerprint=info.model_fingerprint,
                                      metric=_METRICS.get(info.metric, pb.METRIC_UNSPECIFIED),
                                      shard_count=info.shard_count, default_nprobe=info.default_nprobe or 0)
    if info.query_image_size is not None:
        message.query_image_width, message.query_image_height = info.query_image_size
    if info.created_utc is not None:
        message.created_time.FromDatetime(info.created_utc.astimezone(dt.timezone.utc))
    return message


def index_info_from_proto(message: pb.GetIndexInfoResponse) -> IndexInfo:
    """A protobuf GetIndexInfoResponse as IndexInfo (created_utc timezone-aware UTC)."""
    created = message.created_time.ToDatetime(tzinfo=dt.timezone.utc) if message.HasField("created_time") else None
    return IndexInfo(version=message.version, count=message.count, dim=message.dim, factory=message.factory,
                     model_fingerprint=message.model_fingerprint,
                     metric=_METRIC_NAMES.get(message.metric, "unspecified"), created_utc=created,
                     shard_count=message.shard_count, default_nprobe=message.default_nprobe or None,
                     query_image_size=(message.query_image_width, message.query_image_height)
                     if message.query_image_width > 0 and message.query_image_height > 0 else None)


def batch_request_to_proto(requests: list[SearchRequest]) -> pb.BatchSearchRequest:
    """Many SearchRequests as one protobuf BatchSearchRequest."""
    return pb.BatchSearchRequest(requests=[request_to_proto(r) for r in requests])


def batch_request_from_proto(message: pb.BatchSearchRequest) -> list[SearchRequest]:
    """A protobuf BatchSearchRequest as SearchRequests, in order."""
    return [request_from_proto(r) for r in message.requests]


def batch_item_to_proto(item: BatchItem) -> pb.BatchSearchResult:
    """One BatchItem as protobuf: the status code number, the message, and the response when OK."""
    message = pb.BatchSearchResult(code=grpc.StatusCode[item.code].value[0], message=item.message)
    if item.result is not None:
        message.response.CopyFrom(result_to_proto(item.result))
    return message


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def batch_item_from_proto(message: pb.BatchSearchResult) -> BatchItem:
    """A protobuf BatchSearchResult as a BatchItem (result None unless the code is OK)."""
    code = _CODE_NAMES.get(message.code, "UNKNOWN")
    result = result_from_proto(message.response) if code == "OK" else None
    return BatchItem(result=result, code=code, message=message.message)


def batch_response_to_proto(items: list[BatchItem], index_version: str, took_us: int) -> pb.BatchSearchResponse:
    """The BatchItems of a batch as a protobuf BatchSearchResponse."""
    return pb.BatchSearchResponse(results=[batch_item_to_proto(i) for i in items], index_version=index_version,
                                  took_us=took_us)


def batch_response_from_proto(message: pb.BatchSearchResponse) -> list[BatchItem]:
    """A protobuf BatchSearchResponse as BatchItems, in request order."""
    return [batch_item_from_proto(r) for r in message.results]


def embedding_to_proto(embedding: Embedding) -> pb.EmbedResponse:
    """An Embedding as a protobuf EmbedResponse."""
    return pb.EmbedResponse(vector=pb.Vector(values=np.asarray(embedding.vector, np.float32).ravel().tolist()),
                            model_fingerprint=embedding.model_fingerprint, took_us=embedding.took_us)


def embedding_from_proto(message: pb.EmbedResponse) -> Embedding:
    """A protobuf EmbedResponse as an Embedding (float32 vector)."""
    return Embedding(vector=np.asarray(message.vector.values, dtype=np.float32),
                     model_fingerprint=message.model_fingerprint, took_us=message.took_us)


def shard_query_to_proto(query: ShardQuery) -> shard_pb2.ShardSearchRequest:
    """A ShardQuery as a protobuf ShardSearchRequest (nprobe None -> 0)."""
    vectors = np.asarray(query.vectors, dtype=np.float32)
    return shard_pb2.ShardSearchRequest(queries=[pb.Vector(values=row.tolist()) for row in vectors], k=query.k,
                                        nprobe=query.nprobe or 0, filter=filter_to_proto(query.filter),
                                        index_version=query.index_version)


def shard_query_from_proto(message: shard_pb2.ShardSearchRequest) -> ShardQuery:
    """A protobuf ShardSearchRequest as a ShardQuery (no queries: a (0, 0) array); InvalidQuery on ragged rows."""
    rows = [np.asarray(q.values, dtype=np.float32) for q in message.queries]
    dims = {len(row) for row in rows}
    if len(dims) > 1:
        raise InvalidQuery(f"the shard queries have different dimensions: {sorted(dims)}")
    vectors = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    return ShardQuery(vectors=vectors, k=message.k, nprobe=message.nprobe or None,
                      filter=filter_from_proto(message.filter), index_version=message.index_version)


def shard_answer_to_proto(answer: ShardAnswer) -> shard_pb2.ShardSearchResponse:
    """A ShardAnswer as a protobuf ShardSearchResponse (scores and ids flattened row-major)."""
    candidates = [shard_pb2.ShardCandidates(shard=part.shard, k=int(part.ids.shape[1]),
                                            scores=np.asarray(part.scores, np.float32).ravel().tolist(),
                                            ids=np.asarray(part.ids, np.int64).ravel().tolist())
                  for part in answer.parts]
    return shard_pb2.ShardSearchResponse(candidates=candidates, shards=list(answer.shards),
                                         index_version=answer.index_version, took_us=answer.took_us)


def shard_answer_from_proto(message: shard_pb2.ShardSearchResponse) -> ShardAnswer:
    """A protobuf ShardSearchResponse as a ShardAnswer ((nq, k) arrays per shard)."""
    parts = []
    for candidates in message.candidates:
        k = max(int(candidates.k), 1)
        scores = np.asarray(candidates.scores, dtype=np.float32).reshape(-1, k)
        ids = np.asarray(candidates.ids, dtype=np.int64).reshape(-1, k)
        if scores.shape != ids.shape:
            raise ValueError(f"shard {candidates.shard} sent {scores.size} scores but {ids.size} ids")
        parts.append(ShardPart(int(candidates.shard), scores, ids))
    return ShardAnswer(parts=tuple(parts), shards=tuple(message.shards), index_version=message.index_version,
                       took_us=message.took_us)

