"""Round trips of every protobuf <-> plain-type conversion in engine.convert."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from engine import convert
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


def _product(price: float | None = 19.5) -> Product:
    return Product(product_id="p-1", title="Blue shirt", category="Shirts", brand="Acme", price=price,
                   currency="EUR", in_stock=False, image_url="https://cdn.example.com/p-1.jpg",
                   attributes={"baseColour": "Blue", "season": "Summer"}, split=None)


@pytest.mark.parametrize("price", [19.5, 0.0, None])
def test_product_round_trip(price: float | None) -> None:
    product = _product(price)
    message = convert.product_to_proto(product)
    assert message.HasField("price") == (price is not None)
    assert convert.product_from_proto(pb.Product.FromString(message.SerializeToString())) == product


@pytest.mark.parametrize("search_filter", [
    SearchFilter(),
    SearchFilter(categories=("Shirts", "Tshirts"), min_price=0.0, max_price=50.0, in_stock_only=True),
    SearchFilter(min_price=10.0),
    SearchFilter(max_price=0.0),
    SearchFilter(brands=("Acme", "Nike"), in_stock_only=True),
])
def test_filter_round_trip(search_filter: SearchFilter) -> None:
    message = pb.Filter.FromString(convert.filter_to_proto(search_filter).SerializeToString())
    assert convert.filter_from_proto(message) == search_filter


@pytest.mark.parametrize("options", [SearchOptions(), SearchOptions(nprobe=32, exclude_query_product=False),
                                     SearchOptions(exclude_query_product=True),
                                     SearchOptions(exact_rerank=False, one_per_product=False),
                                     SearchOptions(nprobe=1, exact_rerank=False)])
def test_options_round_trip(options: SearchOptions) -> None:
    message = pb.SearchOptions.FromString(convert.options_to_proto(options).SerializeToString())
    assert convert.options_from_proto(message) == options


@pytest.mark.parametrize("query", [
    SearchQuery(image=b"\x89PNG fake bytes"),
    SearchQuery(image=b""),
    SearchQuery(vector=np.array([0.5, -1.0, 2.25], dtype=np.float32)),
    SearchQuery(product_id="p-1"),
    SearchQuery(),
])
def test_request_round_trip(query: SearchQuery) -> None:
    request = SearchRequest(query=query, top_k=7, filter=SearchFilter(categories=("Shirts",)),
                            options=SearchOptions(nprobe=4))
    message = pb.SearchRequest.FromString(convert.request_to_proto(request).SerializeToString())
    back = convert.request_from_proto(message)
    assert back == request
    assert back.query.kind == query.kind


def test_request_defaults_round_trip() -> None:
    request = SearchRequest(query=SearchQuery(product_id="x"))
    message = convert.request_to_proto(request)
    assert message.top_k == 0 and message.options.nprobe == 0
    assert convert.request_from_proto(message) == request


def test_result_round_trip() -> None:
    hits = (SearchHit("p-1", 0.75, _product()), SearchHit("p-2", -0.25, _product(None)))
    result = SearchResult(hits=hits, index_version="20261129T031500Z", took_us=1234)
    message = pb.SearchResponse.FromString(convert.result_to_proto(result).SerializeToString())
    assert convert.result_from_proto(message) == result


def test_partial_result_round_trip() -> None:
    result = SearchResult(hits=(SearchHit("p-1", 0.75, _product()),), index_version="v1", missing_shards=(1, 3))
    message = pb.SearchResponse.FromString(convert.result_to_proto(result).SerializeToString())
    assert message.partial and list(message.missing_shards) == [1, 3]
    assert convert.result_from_proto(message) == result and result.partial
    assert not convert.result_from_proto(convert.result_to_proto(SearchResult((), "v1"))).partial


@pytest.mark.parametrize("nprobe", [None, 7])
def test_shard_query_round_trip(nprobe: int | None) -> None:
    query = ShardQuery(vectors=np.arange(8, dtype=np.float32).reshape(2, 4) / 10, k=25, nprobe=nprobe,
                       filter=SearchFilter(categories=("Shirts",), max_price=30.0), index_version="v1")
    message = shard_pb2.ShardSearchRequest.FromString(convert.shard_query_to_proto(query).SerializeToString())
    assert convert.shard_query_from_proto(message) == query


def test_shard_query_with_ragged_vectors_is_invalid() -> None:
    from engine.errors import InvalidQuery

    message = shard_pb2.ShardSearchRequest(queries=[pb.Vector(values=[1.0, 0.0]), pb.Vector(values=[1.0])], k=1)
    with pytest.raises(InvalidQuery, match="dimensions"):
        convert.shard_query_from_proto(message)


def test_shard_answer_round_trip() -> None:
    parts = (ShardPart(0, np.array([[0.9, 0.5], [0.7, -np.inf]], np.float32), np.array([[3, 1], [2, -1]])),
             ShardPart(2, np.array([[0.8, 0.1], [0.6, 0.2]], np.float32), np.array([[7, 9], [8, 6]])))
    answer = ShardAnswer(parts=parts, shards=(0, 1, 2), index_version="v1", took_us=12)
    message = shard_pb2.ShardSearchResponse.FromString(convert.shard_answer_to_proto(answer).SerializeToString())
    assert convert.shard_answer_from_proto(message) == answer


@pytest.mark.parametrize("created, query_size", [(dt.datetime(2026, 11, 29, 3, 15, tzinfo=dt.timezone.utc),
                                                  (288, 384)), (None, None)])
def test_index_info_round_trip(created: dt.datetime | None, query_size: tuple[int, int] | None) -> None:
    info = IndexInfo(version="20261129T031500Z", count=1000, dim=64, factory="IVF64,PQ16x8",
                     model_fingerprint="ab" * 32, metric="inner_product", created_utc=created, shard_count=2,
                     default_nprobe=16, query_image_size=query_size)
    message = pb.GetIndexInfoResponse.FromString(convert.index_info_to_proto(info).SerializeToString())
    assert message.metric == pb.METRIC_INNER_PRODUCT
    assert convert.index_info_from_proto(message) == info


def test_options_unset_flags_mean_true() -> None:
    options = convert.options_from_proto(pb.SearchOptions())  # what an older client sends
    assert options.exact_rerank and options.one_per_product and options.exclude_query_product is None


def test_batch_request_round_trip() -> None:
    requests = [SearchRequest(query=SearchQuery(vector=np.ones(4, np.float32)), top_k=3),
                SearchRequest(query=SearchQuery(product_id="p-9"), filter=SearchFilter(brands=("Acme",)),
                              options=SearchOptions(one_per_product=False))]
    message = pb.BatchSearchRequest.FromString(convert.batch_request_to_proto(requests).SerializeToString())
    assert convert.batch_request_from_proto(message) == requests


def test_batch_response_round_trip() -> None:
    ok = SearchResult(hits=(SearchHit("p-1", 0.5, _product()),), index_version="v1", took_us=7)
    items = [BatchItem(result=ok), BatchItem(result=None, code="NOT_FOUND", message="no product 'x'"),
             BatchItem(result=None, code="INVALID_ARGUMENT", message="top_k must be between 1 and 1000")]
    message = pb.BatchSearchResponse.FromString(
        convert.batch_response_to_proto(items, "v1", 99).SerializeToString())
    assert message.results[1].code == 5 and message.index_version == "v1" and message.took_us == 99
    assert convert.batch_response_from_proto(message) == items


def test_embedding_round_trip() -> None:
    embedding = Embedding(vector=np.array([0.6, 0.8, 0.0], dtype=np.float32), model_fingerprint="cd" * 32,
                          took_us=42)
    message = pb.EmbedResponse.FromString(convert.embedding_to_proto(embedding).SerializeToString())
    assert convert.embedding_from_proto(message) == embedding
