"""Round trip, sharded search, atomic publish and corruption handling of the index version format."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.build import add_vectors, build_index_from_vectors, plan_for, train_index
from indexer.fill import assign_shards, shard_of
from indexer.search import search_shards
from indexer.validate import shard_ids
from indexer.version import (
    VersionError,
    current_version_path,
    list_versions,
    open_current,
    open_version,
    publish_current,
    read_current,
)
from model.catalog import Product

DIM = 32


def make_products(n: int) -> list[Product]:
    """Hand-made products covering unknown price/brand, out-of-stock and attributes."""
    return [
        Product(product_id=f"p{i}", title=f"item {i}", category=("Shirts", "Shoes", "Bags")[i % 3],
                brand="" if i % 2 else "acme", price=None if i % 5 == 0 else float(i), currency="EUR",
                in_stock=i % 7 != 0, image_url=f"https://cdn.example.com/{i}.jpg",
                attributes={"baseColour": "Red", "gender": "Women"}, split="train")
        for i in range(n)
    ]


def make_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    xb = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(xb)
    return xb


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, list[Product]]:
    """One exact 2-shard version published under a fresh root."""
    root = tmp_path_factory.mktemp("index")
    xb, products = make_vectors(300), make_products(300)
    path = build_index_from_vectors(xb, products, root, "f" * 64, root / "model", num_shards=2, validation_queries=50)
    return root, path, xb, products


def test_round_trip(built: tuple[Path, Path, np.ndarray, list[Product]]) -> None:
    root, path, xb, products = built
    assert read_current(root) == path.name and current_version_path(root) == path
    assert list_versions(root) == [path.name]
    with open_version(path, verify_checksums=True) as version:
        assert (version.count, version.dim, version.factory, version.name) == (300, DIM, "IDMap,Flat", path.name)
        assert version.model_fingerprint == "f" * 64
        by_hash = np.bincount(assign_shards([p.product_id for p in products], 2), minlength=2).tolist()
        assert [s.ntotal for s in version.shards] == by_hash and sum(by_hash) == 300 and min(by_hash) > 100
        assert all(shard_of(version.product(int(i)).product_id, 2) == s  # sha1(product id) mod 2 picks the shard
                   for s, shard in enumerate(version.shards) for i in shard_ids(shard)[:20])
        assert version.product(7) == products[7]
        assert version.products([3, 0, 299]) == [products[3], products[0], products[299]]
        assert version.internal_id("p42") == 42 and version.internal_id("nope") is None
        np.testing.assert_allclose(version.vector(5), xb[5], atol=1e-3)
        assert version.vector(5).dtype == np.float32 and version.vectors.dtype == np.float16
        np.testing.assert_allclose(version.vectors_of([1, 2]), xb[[1, 2]], atol=1e-3)
        with pytest.raises(KeyError):
            version.product(300)
        with pytest.raises(KeyError):
            version.vector(-1)
        f = version.filters
        assert len(f) == 300 and f.category_vocab == ("Bags", "Shirts", "Shoes")
        assert f.category_vocab[f.category[1]] == "Shoes" and f.category_code("Shoes") == 2
        assert f.brand_code("acme") is not None and f.brand_code("zzz") is None
        assert np.isnan(f.price[0]) and f.price[3] == 3.0 and not f.in_stock[7] and f.in_stock[1]


def test_manifest_contents(built: tuple[Path, Path, np.ndarray, list[Product]]) -> None:
    root, path, _, _ = built
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "vitrine-index/1" and manifest["metric"] == "inner_product"
    assert [s["path"] for s in manifest["shards"]] == ["shard-000.faiss", "shard-001.faiss"]
    assert sum(s["count"] for s in manifest["shards"]) == 300 and manifest["sharding"]["num_shards"] == 2
    assert set(manifest["files"]) == {"shard-000.faiss", "shard-001.faiss", "catalog.lmdb/data.mdb", "filters.npz",
                                      "vectors.f16.npy"}
    assert manifest["validation"]["recall_at_10"] == 1.0 and manifest["validation"]["passed"]
    assert manifest["model_path"] == str((root / "model").resolve())
    assert manifest["search_defaults"] == {"nprobe": 1, "rerank_factor": 1}
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_open_current(built: tuple[Path, Path, np.ndarray, list[Product]]) -> None:
    root, path, xb, _ = built
    with open_current(root) as version:
        scores, ids = version.search(xb[:4], 5)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and scores.dtype == np.float32 and ids.dtype == np.int64


def test_a_renamed_version_answers_its_folder_name(built: tuple[Path, Path, np.ndarray, list[Product]],
                                                   tmp_path: Path) -> None:
    """A version copied to another name (a kept backup, a hand-made "known-good") was served and listed under the
    name in its manifest, so `index rollback --to` the reported name pointed at the wrong folder."""
    import shutil

    _, path, _, _ = built
    root = tmp_path / "root"
    shutil.copytree(path, root / "known-good")
    publish_current(root, "known-good")
    with open_current(root) as version:
        assert version.name == "known-good" and version.manifest["version"] == path.name
    with open_version(path) as version:
        assert version.name == path.name


@pytest.mark.parametrize("factory", ["IDMap,Flat", "IVF16,Flat", "IVF16,PQ8x4", "IDMap,IVF16,PQ8x4"])
def test_sharded_search_equals_unsharded(factory: str) -> None:
    xb = make_vectors(3000, seed=1)
    xq = make_vectors(20, seed=2)
    plan = plan_for(len(xb), DIM, factory)
    trained = train_index(xb, plan, seed=0)
    one = add_vectors(trained, xb, 1)
    three = add_vectors(trained, xb, 3)
    for nprobe in (1, 4, 16):
        D1, I1 = search_shards(one, xq, 10, nprobe)
        D3, I3 = search_shards(three, xq, 10, nprobe)
        np.testing.assert_allclose(D1, D3, rtol=1e-5, atol=1e-5)
        assert (I1 == I3).mean() > 0.99  # equal up to ties
    ivf = faiss.try_extract_index_ivf(one[0])
    if ivf is not None:
        assert ivf.nprobe == 1, "per-request nprobe must not mutate the shared index"
        _, I_few = search_shards(one, xq, 10, 1)
        _, I_all = search_shards(one, xq, 10, 16)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
        _, I_true = exact.search(xq, 10)
        hits = [np.mean([len(set(a) & set(b)) for a, b in zip(ids, I_true, strict=True)]) for ids in (I_few, I_all)]
        assert hits[1] > hits[0], "a larger nprobe must reach more true neighbours"


def test_search_pads_when_k_exceeds_count() -> None:
    xb = make_vectors(5)
    shards = add_vectors(train_index(xb, plan_for(5, DIM)), xb, 2)
    scores, ids = search_shards(shards, xb[:1], 8)
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4] and ids[0, 5:].tolist() == [-1, -1, -1]
    assert np.all(np.isneginf(scores[0, 5:]))
    with pytest.raises(ValueError, match="shape"):
        search_shards(shards, np.zeros((1, DIM + 1), np.float32), 3)


def test_publish_replaces_current(tmp_path: Path) -> None:
    xb, products = make_vectors(50), make_products(50)
    first = build_index_from_vectors(xb, products, tmp_path, "a" * 64, tmp_path, validation_queries=10)
    second = build_index_from_vectors(xb, products, tmp_path, "b" * 64, tmp_path, validation_queries=10,
                                      publish=False)
    assert first.name != second.name and read_current(tmp_path) == first.name
    assert list_versions(tmp_path) == [first.name, second.name]
    publish_current(tmp_path, second.name)
    assert read_current(tmp_path) == second.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["CURRENT", "HISTORY", first.name, second.name])
    crashed = tmp_path / ".tmp-20000101T000000Z"  # a build killed mid-write
    crashed.mkdir()
    (crashed / "manifest.json").write_text("{}")
    assert list_versions(tmp_path) == [first.name, second.name], "half-written versions are never listed"
    with pytest.raises(VersionError, match="cannot publish"):
        publish_current(tmp_path, "20000101T000000Z")
    assert read_current(tmp_path) == second.name


def test_missing_current(tmp_path: Path) -> None:
    with pytest.raises(VersionError, match="CURRENT not found"):
        read_current(tmp_path)
    (tmp_path / "CURRENT").write_text("gone\n")
    with pytest.raises(VersionError, match="does not exist"):
        current_version_path(tmp_path)


@pytest.fixture()
def fresh_version(tmp_path: Path) -> Path:
    return build_index_from_vectors(make_vectors(40), make_products(40), tmp_path, "c" * 64, tmp_path,
                                    validation_queries=10, publish=False)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: (v / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda v: (v / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda v: (v / "shard-000.faiss").unlink(), "missing shard-000.faiss"),
        (lambda v: (v / "filters.npz").write_bytes(b"short"), "filters.npz has 5 bytes"),
        (lambda v: (v / "catalog.lmdb" / "data.mdb").unlink(), "missing catalog.lmdb/data.mdb"),
    ],
)
def test_open_damaged_version(fresh_version: Path, damage, message: str) -> None:  # noqa: ANN001
    damage(fresh_version)
    with pytest.raises(VersionError, match=message):
        open_version(fresh_version)


def test_open_detects_checksum_and_format(fresh_version: Path) -> None:
    _flip_byte(fresh_version / "vectors.f16.npy", -3)
    open_version(fresh_version).close()  # same size: only the checksum notices
    with pytest.raises(VersionError, match="vectors.f16.npy is corrupt"):
        open_version(fresh_version, verify_checksums=True)
    manifest = json.loads((fresh_version / "manifest.json").read_text())
    (fresh_version / "manifest.json").write_text(json.dumps({**manifest, "format": "vitrine-index/99"}))
    with pytest.raises(VersionError, match="unsupported format"):
        open_version(fresh_version)
    (fresh_version / "manifest.json").write_text(json.dumps({**manifest, "dim": DIM + 1}))
    with pytest.raises(VersionError, match="has dim 32"):
        open_version(fresh_version)
    with pytest.raises(VersionError, match="does not exist"):
        open_version(fresh_version.parent / "nope")


def test_widen_float16_is_numpys_exact_cast() -> None:
    """The re-rank's float16 -> float32 widening (through torch when loaded) equals numpy's cast bit for bit,
    specials included, for large and small arrays and read-only memory maps alike."""
    import torch  # noqa: F401  (loaded: the fast path is taken)

    from indexer.version import widen_float16

    rng = np.random.default_rng(0)
    values = rng.standard_normal((300, 64)).astype(np.float16)
    values[0, :5] = [np.inf, -np.inf, np.nan, 0.0, -0.0]
    values[1, :2] = [np.finfo(np.float16).tiny / 4, np.finfo(np.float16).max]  # a subnormal, the largest
    expected = values.astype(np.float32)
    for part in (values, values[:3], values[::2]):
        widened = widen_float16(part)
        assert widened.dtype == np.float32 and widened.shape == part.shape
        np.testing.assert_array_equal(widened.view(np.uint32), part.astype(np.float32).view(np.uint32))
    readonly = values.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(widen_float16(readonly), expected)
