"""The Ray backend of the embed stage, in Ray local mode: the same chunks, ids, products, image SHA-1 and bad-image
count as the local backend, embeddings equal to within float16 rounding; resume after a failure; a clear error
without ray. Real images, real LMDB shards, a tiny random ViT.

The Ray tests skip when ray is not installed (it is in the dev extra; `pip install 'vitrine-search[ray]'`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.faults import ENV, InjectedFault
from indexer.job import IndexBuildConfig, build_index
from indexer.version import open_current
from tests.indexer_fixtures import corrupt_record, make_inputs
from vitrine.cli import main

N_IMAGES = 40
CHUNK = 16  # 3 chunks: 16 + 16 + 8 records
BAD_RECORD = 5  # its image bytes are replaced by garbage: both backends must skip and count it

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own settings
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed: pip install 'vitrine-search[ray]'")
RAY_TIMEOUT_S = 600  # Ray start-up plus actors importing torch: ~45 s on 2 idle cores, minutes on busy ones


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shards, checkpoint): 40 mini-catalog images in 40-record LMDB shards, record 5 corrupted on disk."""
    shards, checkpoint = make_inputs(tmp_path_factory.mktemp("ray"), N_IMAGES)
    corrupt_record(shards, BAD_RECORD)
    return shards, checkpoint


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """Ray on this machine with 2 CPUs (the build joins it instead of starting its own).

    ray.init writes ~/.ray/auth_token and sets RAY_AUTH_MODE=token in this process: HOME points to a temporary
    folder meanwhile, and the environment is restored after, so no later test (or the user) inherits them."""
    import ray

    saved = dict(os.environ)
    os.environ["HOME"] = tempfile.mkdtemp(prefix="vitrine-ray-home-")
    try:
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - Ray's own startup timeout (raylet not up within 30 s), seen
            if "timed out during startup" not in str(exc):  # once in a full local run; start it once more
                raise
            ray.shutdown()
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        yield
        ray.shutdown()
    finally:
        shutil.rmtree(os.environ["HOME"], ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def _config(inputs: tuple[Path, Path], root: Path, **overrides: object) -> IndexBuildConfig:
    shards, checkpoint = inputs
    fields: dict = dict(shards_dir=shards, model=checkpoint, index_root=root, chunk_rows=CHUNK, batch_size=8,
                        num_workers=0, validation_queries=10, ray_actors=1)
    return IndexBuildConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def _embed(config: IndexBuildConfig) -> Path:
    build_index(config, ("embed",))
    return Path(config.index_root) / ".work" / "embed"


@pytest.fixture(scope="module")
def local_embed(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local backend's finished embed stage: the reference."""
    return _embed(_config(inputs, tmp_path_factory.mktemp("local")))


def assert_same_embeddings(a: Path, b: Path) -> None:
    """Same records, products, image SHA-1 and bad records; vectors equal up to one float16 rounding step.

    Not bit for bit: Ray batches other images together than the DataLoader does, and a float32 forward
    pass may round differently with another batch size; the float16 result then moves by at most one
    unit in the last place (about 5e-4 for components in [0.5, 1), less below).
    """
    done_a, done_b = (json.loads((p / "done.json").read_text()) for p in (a, b))
    for field in ("records", "embedded", "bad_images", "bad_records", "dim", "model_fingerprint", "chunk_rows"):
        assert done_a[field] == done_b[field], field
    assert (a / "products.jsonl").read_bytes() == (b / "products.jsonl").read_bytes()
    np.testing.assert_array_equal(np.load(a / "image_sha1.npy"), np.load(b / "image_sha1.npy"))
    va, vb = np.load(a / "vectors.f16.npy"), np.load(b / "vectors.f16.npy")
    assert va.shape == vb.shape and va.dtype == vb.dtype == np.float16
    ulps = np.abs(va.view(np.int16).astype(np.int32) - vb.view(np.int16).astype(np.int32))
    assert int(ulps.max()) <= 1, f"{int((ulps > 1).sum())} components differ by more than one float16 step"


@needs_ray
@pytest.mark.timeout(RAY_TIMEOUT_S)
def test_ray_backend_embeds_like_the_local_backend(inputs: tuple[Path, Path], local_embed: Path, ray_local: None,
                                                   tmp_path: Path) -> None:
    remote = _embed(_config(inputs, tmp_path, backend="ray"))
    assert_same_embeddings(local_embed, remote)
    done = json.loads((remote / "done.json").read_text())
    assert done["bad_images"] == 1 and done["bad_records"] == [BAD_RECORD] and done["embedded"] == N_IMAGES - 1
    assert done["last_run"]["backend"] == "ray" and done["last_run"]["chunks_written"] == 3


@needs_ray
@pytest.mark.timeout(RAY_TIMEOUT_S)
def test_ray_backend_resumes_and_the_later_stages_follow(inputs: tuple[Path, Path], local_embed: Path,
                                                         ray_local: None, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    config = _config(inputs, tmp_path, backend="ray")
    monkeypatch.setenv(ENV, "embed:1")
    with pytest.raises(InjectedFault):
        _embed(config)
    assert len(list((tmp_path / ".work" / "embed").glob("chunk-*.npz"))) == 1, "one chunk was durable"
    monkeypatch.delenv(ENV)
    with caplog.at_level(logging.INFO, logger="vitrine.indexer"):
        path = build_index(config)  # every stage: embed resumes on Ray, plan..publish as always
    assert any("resuming after 1 chunk(s)" in r.getMessage() for r in caplog.records)
    remote = tmp_path / ".work" / "embed"
    assert json.loads((remote / "done.json").read_text())["last_run"]["chunks_written"] == 2
    assert_same_embeddings(local_embed, remote)
    with open_current(tmp_path) as version:
        assert version.path == path and version.count == N_IMAGES - 1
        assert version.manifest["build_config"]["backend"] == "ray"
        assert version.manifest["validation"]["recall_at_10"] == 1.0


def test_ray_backend_without_ray_names_the_extra(inputs: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    shards, checkpoint = inputs
    argv = ["index", "build", "--shards", str(shards), "--model", str(checkpoint), "--index-root", str(tmp_path),
            "--backend", "ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--backend ray needs Ray Data" in err and "pip install 'vitrine-search[ray]'" in err
    assert not (tmp_path / ".work").exists(), "nothing ran"


def test_chunk_assembler_takes_rows_in_any_order_once() -> None:
    """The driver's bookkeeping: chunks complete whatever order Ray returns rows in; a repeated row counts once."""
    from indexer.embed_ray import ChunkAssembler

    def batch(records: list[int], bad: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
        ok = np.array([r not in bad for r in records])
        return {"record": np.array(records), "vector": np.arange(len(records) * 2, dtype=np.float16).reshape(-1, 2),
                "ok": ok, "product": np.array([f"p{r}" for r in records], dtype=object),
                "digest": np.array([f"d{r}" for r in records], dtype=object),
                "error": np.array(["" if k else f"bad {r}" for r, k in zip(records, ok, strict=True)], dtype=object)}

    assembler = ChunkAssembler([0, 2], chunk_rows=4, total=10)  # chunk 1 already on disk; chunk 2 has 2 rows
    assert assembler.missing == 6
    assert assembler.add(batch([9, 1, 0])) == []
    assert assembler.add(batch([8, 3, 1], bad=(3,))) == [2]  # record 1 again: no double count
    part = assembler.pop(2)
    assert part["records"] == [8, 9] and part["products"] == ["p8", "p9"] and part["bad"] == []
    assert assembler.add(batch([2, 8])) == [0]  # chunk 2's repeat is ignored once written
    part = assembler.pop(0)
    assert part["records"] == [0, 1, 2] and part["bad"] == [(3, "bad 3")] and part["vectors"].shape == (3, 2)
    assert assembler.missing == 0
    with pytest.raises(RuntimeError, match="not asked for"):
        assembler.add(batch([5]))
