"""The relevance harness: metric oracles on hand-made cases, and a whole run on the mini catalog."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_relevance import main, neighbours, relevance_metrics
from model.catalog import CatalogConfig
from model.data import build_shards
from model.train import TrainConfig, train

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def test_metrics_match_a_hand_computed_case() -> None:
    labels = np.array(["a", "a", "b", "b", "a"], dtype=object)
    queries = np.array([0, 2])
    found = np.array([[2, 1, 4], [0, 1, 4]])  # query 0: miss, hit, hit; query 2: three misses
    metrics = relevance_metrics(found, queries, labels)
    assert metrics["top1"] == 0.0 and metrics["recall@1"] == 0.0 and metrics["recall@5"] == 0.5
    # AP@10 of query 0 = mean(precision at its hits) = (1/2 + 2/3) / 2; query 2 has none
    assert metrics["map@10"] == pytest.approx(round(((1 / 2 + 2 / 3) / 2) / 2, 4))


def test_bootstrap_intervals_and_paired_comparison() -> None:
    from benchmarks.bench_relevance import bootstrap_interval, paired_comparison

    rng = np.random.default_rng(5)
    hits = rng.random(4000) < 0.8
    low, high = bootstrap_interval(hits)
    assert low < hits.mean() < high and 0.015 < high - low < 0.035  # ~ +-1.96 sqrt(.8 .2 / 4000) = +-0.0124
    better = hits | (rng.random(4000) < 0.5)  # the same queries plus about half of the misses
    c = paired_comparison(better, hits)
    assert c["significant"] and c["difference_95"][0] > 0 and c["ratio"] > 1
    assert not paired_comparison(hits, hits)["significant"] and paired_comparison(hits, hits)["difference"] == 0


def test_neighbours_exclude_the_query_float_and_binary() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[3] * 0.99 + 0.01  # 7 is 3's twin
    for binary in (False, True):
        found = neighbours(vectors, np.array([3, 10]), k=5, binary=binary)
        assert found.shape == (2, 5) and 3 not in found[0] and 10 not in found[1]
        assert found[0, 0] == 7


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("relevance")
    build_shards(MINI / "styles.csv", MINI / "images", root / "shards", CatalogConfig(), progress=False)
    return train(TrainConfig(shards_dir=root / "shards", out_dir=root / "model", epochs=1, width=64, depth=1,
                             num_heads=2, embedding_dim=32, max_records=300, progress=False,
                             tasks=("articleType",)))


def test_harness_run_writes_json_markdown_and_plots(tiny_model: Path, tmp_path: Path) -> None:
    code = main(["--csv", str(MINI / "styles.csv"), "--images", str(MINI / "images"), "--model",
                 f"tiny={tiny_model}", "--model", f"again={tiny_model}", "--out", str(tmp_path), "--cache-dir",
                 str(tmp_path / "cache"), "--name", "rel"])
    assert code == 0
    payload = json.loads((tmp_path / "rel.json").read_text())
    result = payload["results"]["models"]["tiny"]
    assert payload["config"]["queries"] == 201 and payload["git_sha"]
    assert 0 <= result["strict"]["top1"] <= result["type"]["top1"] <= 1
    assert result["type"]["top1"] > payload["results"]["chance"]["type"]  # even one epoch beats chance
    assert result["strict"]["recall@1"] == result["strict"]["top1"] <= result["strict"]["recall@10"]
    assert sum(v["queries"] for v in result["per_type"].values()) == 201
    low, high = result["type"]["top1_95"]
    assert low <= result["type"]["top1"] <= high
    paired = payload["results"]["paired"]["tiny"]  # against the last model, here the same one
    assert payload["results"]["baseline"] == "again" and paired["strict"]["difference"] == 0
    assert not paired["type"]["significant"]
    assert "Paired against again" in (tmp_path / "rel.md").read_text()
    assert "| tiny | 32 |" in (tmp_path / "rel.md").read_text()
    for png in ("rel.png", "rel_examples.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache").glob("emb-*.npy"))) == 1  # embeddings cached for the next run


def test_phone_photo_benchmark_makes_rotated_phone_jpegs_of_the_catalog_photo() -> None:
    """bench_phone_photos' synthetic phone photo: stored landscape with EXIF orientation 6, shown as the upscaled
    catalog photo, and decoded at reduced scale by the default model's Embedder."""
    from PIL import Image

    from benchmarks.bench_phone_photos import phone_jpeg
    from model.checkpoint import default_model_path
    from model.embedder import Embedder
    from model.images import decode_image

    photo = Image.open(sorted((MINI / "images").glob("*.jpg"))[0]).convert("RGB")
    data = phone_jpeg(photo, np.random.default_rng(0), (900, 1200))
    assert Image.open(io.BytesIO(data)).size == (1200, 900)  # stored landscape
    shown = decode_image(data)
    assert shown.size == (900, 1200)
    expected = np.asarray(photo.resize((60, 80)), dtype=np.float32)
    assert np.abs(np.asarray(shown.resize((60, 80)), dtype=np.float32) - expected).mean() < 6.0
    reduced = Embedder.load(default_model_path(), precision="fp32").decode(data)
    assert reduced.size == (450, 600)  # 1/2: 1/4 (225x300) is under 3 x 96x128


def test_fold_benchmark_times_both_variants_and_finds_the_same_embeddings(tmp_path: Path) -> None:
    """bench_fold on a few real photos: the default model and the frozen CNN, folded and not, give the same
    embeddings, and every variant was timed."""
    from benchmarks.bench_fold import main as bench_fold

    assert bench_fold(["--images", "6", "--batch-size", "3", "--train-batch-size", "2", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "fold.json").read_text())["results"]
    assert results["inference_default"]["folded_batchnorms"] == 33  # the default's stem: 1 + 2 + 10 x 3
    assert results["inference_frozen_cnn"]["folded_batchnorms"] == 49
    for key in ("inference_default", "inference_frozen_cnn"):
        assert results[key]["min_cosine"] > 0.99999 and results[key]["images"] == 6
    for key in ("inference_default", "inference_frozen_cnn", "training_default"):
        assert {"unfolded", "folded"} <= set(results[key]["images_per_s"])
        assert all(rate > 0 for rate in results[key]["images_per_s"].values())
    assert "now / before" in (tmp_path / "fold.md").read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--type-column", "nosuch"], "column 'nosuch' is not a label column"),  # was a ValueError traceback
    (["--strict-columns", "baseColour,colr"], "column 'colr' is not a label column"),  # strict silently == type
    (["--query-split", "eval"], "no query images"),  # a traceback; a CSV without a split column too
    (["--baseline", "other"], "--baseline 'other' is not one of the models"),  # said after embedding every model
])
def test_harness_bad_columns_are_clear_errors_before_embedding(tmp_path: Path, flags: list[str],
                                                               message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["--csv", str(MINI / "styles.csv"), "--images", str(MINI / "images"), "--model",
              f"m={tmp_path / 'no-model'}", "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_harness_max_queries_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # 0 was an IndexError traceback after embedding
        main(["--model", "m=x", "--max-queries", "0"])
    assert exit_info.value.code == 2 and "--max-queries must be >= 1" in capsys.readouterr().err


def test_harness_on_a_catalog_without_splits_draws_queries_from_every_product(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    """A shop's catalog has no split column: `--query-split '*'` makes every product a possible query (a seeded
    sample with --max-queries); it stopped at "no query images"."""
    lines = (MINI / "styles.csv").read_text().splitlines()
    keep = [i for i, column in enumerate(lines[0].split(",")) if column != "split"]
    (tmp_path / "shop.csv").write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in lines) + "\n")
    args = ["--csv", str(tmp_path / "shop.csv"), "--images", str(MINI / "images"), "--model", f"tiny={tiny_model}",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--name", "shop"]
    with pytest.raises(SystemExit, match="--query-split '\\*'"):  # the hint names the way out
        main(args)
    assert main([*args, "--query-split", "*", "--max-queries", "150"]) == 0
    payload = json.loads((tmp_path / "out" / "shop.json").read_text())
    assert payload["config"]["queries"] == 150 and payload["config"]["gallery"] > 1000  # every product with an image
    assert "Queries: 150 images of any split" in (tmp_path / "out" / "shop.md").read_text()
