"""Weak labels from text on the real mini catalog: vocabulary, head labels, tail clusters, report, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.annotate import (
    WeakLabelConfig,
    build_weak_labels,
    load_weak_labels,
    normalize_text,
    product_terms,
    save_weak_labels,
    tokenize,
)
from model.catalog import CatalogConfig, read_catalog

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"
CONFIG = WeakLabelConfig(min_count=3, head_min_count=25, tail_clusters=12, seed=1)


@pytest.fixture(scope="module")
def products() -> list:  # type: ignore[type-arg]
    return read_catalog(MINI / "styles.csv", CatalogConfig()).products


def test_normalise_and_tokenise() -> None:
    assert normalize_text("Café  T-SHIRT") == "cafe  t-shirt"
    assert tokenize("Nike Men's Navy-Blue T-shirt, pack of 2") == ["nike", "men", "navy", "blue", "shirt", "2"]


def test_terms_are_uni_and_bigrams_of_configured_fields(products: list) -> None:  # type: ignore[type-arg]
    product = next(p for p in products if p.title == "Nike Men Media Blue Polo T-shirt")
    terms = product_terms(product, WeakLabelConfig(text_fields=("title", "usage")))
    assert {"nike", "polo", "blue polo", "nike men", "sports"} <= terms and "t" not in terms


def test_head_terms_tail_clusters_and_report(products: list) -> None:  # type: ignore[type-arg]
    weak = build_weak_labels(products, CONFIG)
    report = weak.report
    head = [label for label in weak.labels if not label.startswith("cluster:")]
    assert report["head_labels"] == len(head) > 10 and report["tail_clusters"] == len(weak.clusters) == 12
    assert report["vocabulary_size"] == report["head_labels"] + report["tail_terms"]
    assert {"men", "women", "black"} <= set(head)
    # every tail term sits in exactly one cluster, and clusters are labels images actually get
    members = [t for terms in weak.clusters.values() for t in terms]
    assert len(members) == len(set(members)) == report["tail_terms"]
    used = {i for labels in weak.product_labels.values() for i in labels}
    assert any(weak.labels[i].startswith("cluster:") for i in used)
    assert report["coverage"] > 0.95 and report["labels_per_image"]["mean"] > 2
    # clustering lifts the rare terms: no label of the result is as rare as the rarest vocabulary terms
    assert report["images_per_label_after"]["min"] >= report["images_per_label_before"]["min"]
    shirt = next(p for p in products if "Shirt" in p.title and "T-shirt" not in p.title)
    assert weak.labels.index("shirt") in weak.product_labels[shirt.product_id]


def test_deterministic_and_round_trip(products: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    first, second = build_weak_labels(products, CONFIG), build_weak_labels(products, CONFIG)
    assert first.labels == second.labels and first.product_labels == second.product_labels
    assert first.clusters == second.clusters
    save_weak_labels(first, tmp_path / "weak.json")
    loaded = load_weak_labels(tmp_path / "weak.json")
    assert loaded.product_labels == first.product_labels and loaded.config == CONFIG
    text = (tmp_path / "weak.report.md").read_text()
    assert "vocabulary" in text and "| cluster:0 |" in text
    (tmp_path / "other.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="not a weak-labels file"):
        load_weak_labels(tmp_path / "other.json")


def test_a_small_catalog_with_few_head_terms_gets_no_empty_clusters(products: list) -> None:  # type: ignore[type-arg]
    """With two head terms, most tail terms share one co-occurrence profile: k-means was asked for 64 clusters
    of a handful of distinct points and left clusters without a term (labels no image carries)."""
    weak = build_weak_labels(products[:400], WeakLabelConfig(min_count=3, head_min_count=100, tail_clusters=64))
    head = [label for label in weak.labels if not label.startswith("cluster:")]
    assert head == ["men", "women"]  # the setting of the case: very few head terms
    assert 1 < len(weak.clusters) < 64 and all(weak.clusters.values())  # every cluster holds terms ...
    carried = {i for labels in weak.product_labels.values() for i in labels}
    assert carried == set(range(len(weak.labels)))  # ... and every label is carried by some image
    assert weak.report["images_per_label_after"]["min"] > 0
