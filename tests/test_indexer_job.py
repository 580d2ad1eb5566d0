"""The staged build job: crash-and-resume (SIGKILL during embed, failure during add), idempotence, --stages,
the memory budget and the validation gate through the command line. Real images, real LMDB, real Faiss."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.faults import ENV, InjectedFault
from indexer.job import IndexBuildConfig, build_index
from indexer.version import list_versions, open_current, open_version, read_current
from tests.indexer_fixtures import REPO, make_inputs
from vitrine.cli import main

N_IMAGES = 120
CHUNK = 16  # 8 embedding chunks
FACTORY = "IVF4,PQ8x4"  # trained (IVF + PQ) yet fast on 120 vectors
SHARDS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_inputs(tmp_path_factory.mktemp("job"), N_IMAGES)


def _config(inputs: tuple[Path, Path], root: Path, **overrides: object) -> IndexBuildConfig:
    shards, checkpoint = inputs
    fields: dict = dict(shards_dir=shards, model=checkpoint, index_root=root, chunk_rows=CHUNK, batch_size=8,
                        num_workers=2, factory=FACTORY, nprobe=4, num_shards=SHARDS, min_recall_at_10=0.5,
                        validation_queries=30)
    return IndexBuildConfig(**{**fields, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build: the index every resumed build must equal."""
    root = tmp_path_factory.mktemp("reference")
    return build_index(_config(inputs, root))


def assert_same_index(a: Path, b: Path) -> None:
    """Same products in the same internal-id order, same float16 vectors, same shards, same search results."""
    with open_version(a, verify_checksums=True) as x, open_version(b, verify_checksums=True) as y:
        assert (x.count, x.factory, len(x.shards)) == (y.count, y.factory, len(y.shards))
        assert [p.product_id for p in x.products(range(x.count))] == [p.product_id for p in y.products(range(y.count))]
        np.testing.assert_array_equal(np.asarray(x.vectors), np.asarray(y.vectors))
        assert [s.ntotal for s in x.shards] == [s.ntotal for s in y.shards]
        queries = np.asarray(x.vectors[::7], dtype=np.float32)
        dx, ix = x.search(queries, 10)
        dy, iy = y.search(queries, 10)
        np.testing.assert_array_equal(ix, iy)
        np.testing.assert_allclose(dx, dy, rtol=1e-6)
        assert x.manifest["validation"]["recall_at_10"] == y.manifest["validation"]["recall_at_10"]


def test_killed_during_embed_resumes_to_the_same_index(inputs: tuple[Path, Path], reference: Path,
                                                       tmp_path: Path) -> None:
    shards, checkpoint = inputs
    argv = [sys.executable, "-m", "vitrine", "index", "build", "--shards", str(shards), "--model", str(checkpoint),
            "--index-root", str(tmp_path), "--chunk-rows", str(CHUNK), "--batch-size", "8", "--factory", FACTORY,
            "--nprobe", "4", "--num-shards", str(SHARDS), "--min-recall", "0.5", "--validation-queries", "30"]
    env = {**os.environ, ENV: "embed:3:kill", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no cleanup ran
    chunks = sorted(p.name for p in (tmp_path / ".work" / "embed").glob("chunk-*.npz"))
    assert chunks == [f"chunk-{i:06d}.npz" for i in range(3)], "3 chunks were durable when it died"
    assert not (tmp_path / "CURRENT").exists() and list_versions(tmp_path) == []
    resumed = subprocess.run(argv, cwd=REPO, env={**env, ENV: ""}, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after 3 chunk(s)" in resumed.stderr
    assert_same_index(tmp_path / read_current(tmp_path), reference)


def test_failure_during_add_resumes_to_the_same_index(inputs: tuple[Path, Path], reference: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    config = _config(inputs, tmp_path)
    monkeypatch.setenv(ENV, "add:1")
    with pytest.raises(InjectedFault):
        build_index(config)
    assert sorted(p.name for p in (tmp_path / ".work" / "add").glob("*.faiss")) == ["shard-000.faiss"]
    assert not (tmp_path / "CURRENT").exists()
    monkeypatch.delenv(ENV)
    with caplog.at_level(logging.INFO, logger="vitrine.indexer"):
        path = build_index(config)
    messages = [r.getMessage() for r in caplog.records]
    assert "stage embed: output valid, skipped" in messages and "stage train: output valid, skipped" in messages
    assert any(m.startswith("add: shard 1 of 3 already filled") for m in messages)
    assert_same_index(path, reference)


def test_rerun_is_idempotent_and_stages_run_in_subsets(inputs: tuple[Path, Path], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    config = _config(inputs, tmp_path, factory=None, nprobe=None, num_shards=1)  # 120 images: exact IDMap,Flat
    build_index(config, ("embed", "plan"))
    plan = json.loads((tmp_path / ".work" / "plan.json").read_text())
    assert plan["plan"]["factory"] == "IDMap,Flat" and plan["memory"]["peak"] > 0
    assert not (tmp_path / ".work" / "train.json").exists() and not (tmp_path / "CURRENT").exists()
    with pytest.raises(Exception, match="stage 'train' has no valid output"):
        build_index(config, ("add",))
    first = build_index(config)
    with caplog.at_level(logging.INFO, logger="vitrine.indexer"):
        again = build_index(config)
    assert again == first and list_versions(tmp_path) == [first.name] and read_current(tmp_path) == first.name
    assert sum("output valid, skipped" in r.getMessage() for r in caplog.records) == 6
    with open_current(tmp_path) as version:
        assert version.manifest["validation"]["recall_at_10"] == 1.0
        assert (version.path / "image_sha1.npy").is_file()
        assert version.manifest["model_fingerprint"] == version.manifest["validation"]["model_fingerprint"]


def test_cli_memory_budget_and_gate_leave_current_untouched(inputs: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    shards, checkpoint = inputs
    base = ["index", "build", "--shards", str(shards), "--model", str(checkpoint), "--index-root", str(tmp_path),
            "--chunk-rows", "64", "--workers", "0", "--validation-queries", "30"]
    assert main(base) == 0
    live = read_current(tmp_path)
    assert main([*base, "--memory-budget", "4KB", "--fresh"]) == 1
    err = capsys.readouterr().err
    assert "memory budget 4.0 KiB" in err and "needs about" in err and "CURRENT is unchanged" in err
    assert main([*base, "--factory", "IVF8,PQ2x4", "--nprobe", "1", "--min-recall", "0.99",
                 "--no-tune"]) == 1
    err = capsys.readouterr().err
    assert "recall@10" in err and "below the floor 0.99" in err and "CURRENT is unchanged" in err
    assert read_current(tmp_path) == live and list_versions(tmp_path) == [live]
    assert main([*base, "--stages", "embed,bogus"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_the_embed_stage_records_its_arithmetic(reference: Path) -> None:
    """The build embeds in the precision `auto` resolves to here (bf16 where the CPU has it) and says which."""
    from model.embedder import resolve_precision

    with open_version(reference) as version:
        assert version.manifest["embedding"]["last_run"]["precision"] == resolve_precision("auto", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        from indexer.embed import EmbedSettings

        EmbedSettings(precision="half")


def test_forward_in_the_workers_embeds_as_the_main_process_does(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """The embed stage's two places for the forward pass give the same rows (to within float rounding:
    one torch thread per worker sums in another order) and each run records where it ran."""
    runs = {}
    for place in ("main", "workers"):
        root = tmp_path / place
        build_index(_config(inputs, root, forward=place), ("embed",))
        done = json.loads((root / ".work" / "embed" / "done.json").read_text())
        assert done["last_run"]["forward"] == place
        runs[place] = (np.load(root / ".work" / "embed" / "vectors.f16.npy").astype(np.float32),
                       (root / ".work" / "embed" / "products.jsonl").read_text())
    assert runs["main"][1] == runs["workers"][1]  # same products, same internal-id order
    np.testing.assert_allclose(runs["main"][0], runs["workers"][0], atol=1e-2)
    assert np.median(np.sum(runs["main"][0] * runs["workers"][0], axis=1)) > 0.999


def test_forward_place_auto_and_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer import embed

    monkeypatch.setattr(embed, "usable_cores", lambda: 2)
    assert embed.forward_in_workers(embed.EmbedSettings(num_workers=2))  # every core decodes: embed there too
    assert not embed.forward_in_workers(embed.EmbedSettings(num_workers=1))
    assert not embed.forward_in_workers(embed.EmbedSettings(num_workers=2, device="cuda"))
    monkeypatch.setattr(embed, "usable_cores", lambda: 16)
    assert not embed.forward_in_workers(embed.EmbedSettings(num_workers=2))  # cores to spare: main's threads
    assert embed.forward_in_workers(embed.EmbedSettings(num_workers=16))
    assert embed.forward_in_workers(embed.EmbedSettings(num_workers=1, forward="workers"))
    assert not embed.forward_in_workers(embed.EmbedSettings(num_workers=16, forward="main"))
    with pytest.raises(ValueError, match="unknown forward place"):
        embed.EmbedSettings(forward="gpu")


@pytest.mark.parametrize("flags, message", [
    (["--chunk-rows", "0"], "chunk_rows must be at least 1, got 0"),  # was a ZeroDivisionError traceback
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--workers", "-1"], "num_workers must be at least 0, got -1"),
    (["--nprobe", "-3"], "nprobe must be at least 1"),  # was published as the version's search default
    (["--min-recall", "2"], "must lie in [0, 1], got 2.0"),  # a gate no build could pass
])
def test_build_flags_out_of_range_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], message: str) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    assert main(["index", "build", "--shards", str(shards), "--index-root", str(tmp_path / "index"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "index" / "CURRENT").exists()


def test_fresh_is_refused_while_a_build_runs_in_the_work_folder(inputs: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--fresh` deleted the work folder, lock file included, of a build still running there: that build lost its
    outputs and the two then ran at once. Now it waits for no one: it is refused, and the running build's outputs
    stay; once that build is gone, --fresh redoes every stage."""
    import fcntl

    shards, checkpoint = inputs
    base = ["index", "build", "--shards", str(shards), "--model", str(checkpoint), "--index-root", str(tmp_path),
            "--chunk-rows", "64", "--workers", "0", "--validation-queries", "30"]
    assert main(base) == 0
    live = read_current(tmp_path)
    outputs = sorted(p.relative_to(tmp_path) for p in (tmp_path / ".work").rglob("*"))
    with open(tmp_path / ".work" / ".lock", "a") as running:  # what a running build holds
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*base, "--fresh"]) == 2
        assert "another build or update is running" in capsys.readouterr().err
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / ".work").rglob("*")) == outputs
    assert read_current(tmp_path) == live
    assert main([*base, "--fresh"]) == 0
    assert read_current(tmp_path) != live  # every stage redone: a new version


def test_a_full_build_from_a_truncated_export_is_not_published(inputs: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`index update` refuses to take most of the shop out of the index, but the weekly full rebuild (nightly.sh) of
    the same truncated export published a version with a twelfth of the products. The build now has the guard too:
    exit 1, CURRENT untouched, no unpublished version left for a rollback to land on; --max-removed 1 publishes."""
    from model.catalog import CatalogConfig
    from model.data import build_shards
    from tests.indexer_fixtures import MINI, catalog_rows, write_catalog_rows

    shards, checkpoint = inputs
    common = ["--model", str(checkpoint), "--index-root", str(tmp_path / "index"), "--workers", "0",
              "--validation-queries", "5"]
    assert main(["index", "build", "--shards", str(shards), *common]) == 0
    live = read_current(tmp_path / "index")
    write_catalog_rows(tmp_path / "truncated.csv", catalog_rows(10))
    build_shards(tmp_path / "truncated.csv", MINI / "images", tmp_path / "truncated", CatalogConfig(), progress=False)
    truncated = ["index", "build", "--shards", str(tmp_path / "truncated"), *common]
    assert main(truncated) == 1
    assert f"lacks 110 of the {N_IMAGES} products of the live version {live}" in capsys.readouterr().err
    assert read_current(tmp_path / "index") == live and list_versions(tmp_path / "index") == [live]
    assert not [p for p in (tmp_path / "index").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert main([*truncated, "--max-removed", "1"]) == 0
    with open_current(tmp_path / "index") as version:
        assert version.count == 10 and version.name != live
