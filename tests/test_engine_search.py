"""Unit tests of the search pieces that need no server: filter masks, normalisation, error mapping."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from engine.errors import InvalidQuery, NotReady, ProductNotFound, status_for
from engine.search import filter_mask, normalize
from engine.types import SearchFilter, SearchQuery
from indexer.store import Filters
from model.catalog import Product
from model.images import ImageDecodeError


def _filters() -> Filters:
    rows = [("Shirts", 19.99, True), ("Shirts", None, True), ("Jeans", 5.0, False), ("Watches", 100.0, True)]
    products = [Product(product_id=str(i), title="", category=c, brand="", price=p, currency="", in_stock=s,
                        image_url="", attributes={}, split=None) for i, (c, p, s) in enumerate(rows)]
    return Filters.from_products(products)


@pytest.mark.parametrize(("search_filter", "expected"), [
    (SearchFilter(), [0, 1, 2, 3]),
    (SearchFilter(categories=("Shirts",)), [0, 1]),
    (SearchFilter(categories=("Unknown",)), []),
    (SearchFilter(categories=("Jeans", "Watches")), [2, 3]),
    (SearchFilter(min_price=19.99), [0, 3]),  # a bound equal to a stored float32 price matches
    (SearchFilter(max_price=19.99), [0, 2]),  # unknown prices never match a set bound
    (SearchFilter(in_stock_only=True), [0, 1, 3]),
    (SearchFilter(categories=("Shirts", "Jeans"), max_price=50.0, in_stock_only=True), [0]),
])
def test_filter_mask(search_filter: SearchFilter, expected: list[int]) -> None:
    filters = _filters()
    assert np.flatnonzero(filter_mask(filters, None, search_filter)).tolist() == expected
    ids = np.array([3, 0, 2], dtype=np.int64)
    assert ids[filter_mask(filters, ids, search_filter)].tolist() == [i for i in ids.tolist() if i in expected]


def test_normalize() -> None:
    assert np.linalg.norm(normalize(np.array([3.0, 4.0]), "v")) == pytest.approx(1.0)
    with pytest.raises(InvalidQuery, match="zeros"):
        normalize(np.zeros(4), "query vector")
    with pytest.raises(InvalidQuery, match="NaN"):
        normalize(np.array([1.0, np.nan]), "query vector")


def test_query_kind() -> None:
    assert SearchQuery().kind == "empty"
    assert SearchQuery(product_id="a").kind == "product_id"
    assert SearchQuery(image=b"", product_id="a").kind == "ambiguous"


@pytest.mark.parametrize(("exc", "code", "text"), [
    (InvalidQuery("top_k must be between 1 and 1000"), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (ImageDecodeError("truncated JPEG"), grpc.StatusCode.INVALID_ARGUMENT, "cannot decode the query image"),
    (ProductNotFound("product id 'x' is not in index version v"), grpc.StatusCode.NOT_FOUND, "product id 'x'"),
    (NotReady("still loading"), grpc.StatusCode.UNAVAILABLE, "loading"),
    (ZeroDivisionError("boom"), grpc.StatusCode.INTERNAL, "ZeroDivisionError"),
])
def test_status_for(exc: Exception, code: grpc.StatusCode, text: str) -> None:
    got_code, message = status_for(exc)
    assert got_code == code and text in message


def test_status_messages_are_cut_to_fit_a_clients_metadata_limit() -> None:
    """A status message quoting a huge input overflowed the client's 8-16 KiB metadata limit: the client got
    RESOURCE_EXHAUSTED ("Stream removed") instead of the status."""
    for exc in (InvalidQuery("bad filter " + "x" * 50_000), ValueError("y" * 50_000)):
        code, message = status_for(exc)
        assert code == (grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidQuery) else grpc.StatusCode.INTERNAL)
        assert len(message) < 2100 and message.endswith(" characters)") and "message cut" in message
