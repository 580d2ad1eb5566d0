"""`vitrine index build` as a resumable, idempotent job of named stages.

    embed -> plan -> train -> add -> validate -> publish

Each stage writes its outputs into the work folder (default ``<index_root>/.work``) under temporary
names and renames them; its ``<stage>.json`` (or ``embed/done.json``) records a key: a hash of the
inputs and settings the output depends on, chained from the stage before. A stage whose output
exists with the right key is skipped; a changed input or setting re-runs that stage and those after
it. Killed at any point, the job resumes: the embed stage at its next chunk, the add stage at its
next shard. The embed stage runs locally or on Ray (``backend``); both write the same chunks, so the
backend is not part of any key: a build started on one resumes on the other. `--stages` runs a
subset (each needs the outputs of the stages before it). One job runs per work folder at a time (an
flock on ``.lock``).

Work folder::

    embed/      chunk-*.npz while running; then vectors.f16.npy, products.jsonl, image_sha1.npy, done.json
    plan.json   the IndexPlan (factory string, nprobe, re-rank factor) and the memory estimate
    train/      trained.faiss (the empty trained index every shard clones)
    add/        shard-000.faiss ... + shard-000.json markers
    validate.json  the name of the validated version (now a complete folder under the index root)
    publish.json   the version published as CURRENT
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer import embed as embed_stage
from indexer.embed import EmbedSettings, read_json, write_json
from indexer.errors import StageError, ValidationFailed, VersionError
from indexer.faults import maybe_fail
from indexer.fill import CoarseAssigner, assign_shards, fill_shard, sample_rows, train_index
from indexer.plan import IndexPlan, check_memory, format_bytes, plan_from_factory, plan_index
from indexer.publish import publish_version, remove_version, removed_from_live, write_built_version
from indexer.validate import validate_version

logger = logging.getLogger("vitrine.indexer")

STAGES = ("embed", "plan", "train", "add", "validate", "publish")


@dataclass(frozen=True)
class IndexBuildConfig:
    """Configuration of one index build; saved as build_config in the version's manifest."""

    shards_dir: str | Path  # catalog shards folder (manifest.json + shard-*.lmdb) from model.data ingest
    model: str | Path  # checkpoint folder (model.pt + model_card.json)
    index_root: str | Path  # versions are written to <index_root>/<version>/, CURRENT beside them
    work_dir: str | Path | None = None  # stage outputs; None: <index_root>/.work
    batch_size: int = 64  # images per embedder forward pass
    num_workers: int = 2  # DataLoader worker processes decoding images (0: decode inline)
    chunk_rows: int = 4096  # catalog records per embedding chunk (the unit of resume)
    device: str = "cpu"  # torch device of the embedder
    precision: str = "auto"  # embedder arithmetic: auto (bf16 where the CPU/GPU has it natively), fp32, bf16
    forward: str = "auto"  # embed stage: forward pass in the main process or the DataLoader workers (indexer.embed)
    backend: str = "local"  # embed stage: "local" (DataLoader workers) or "ray" (Ray Data actors, the ray extra)
    ray_address: str | None = None  # backend "ray": cluster address ("auto": the running one); None: start Ray here
    ray_actors: int = 2  # backend "ray": embedding actors (one model replica each)
    ray_cpus_per_actor: float = 1.0  # backend "ray": CPUs each actor reserves (its torch threads)
    factory: str | None = None  # Faiss factory string; None: planned
    nprobe: int | None = None  # default lists probed per query; None: the plan's default
    num_shards: int = 1  # Faiss shards; a product's shard = sha1(product id) mod num_shards
    memory_budget: int | None = None  # bytes the build may use (plan + estimate); None: no limit
    target_recall: float = 0.95  # recall@10 (with re-ranking) the plan aims for
    add_chunk_rows: int = 65_536  # vectors encoded per add call (bounds the add stage's memory)
    use_gpu: bool | None = None  # Faiss on GPU for train/add; None: when Faiss sees a GPU
    seed: int = 0  # seeds the training sample, k-means and the validation queries
    validation_queries: int = 256  # held-out catalog vectors used as validation queries
    min_recall_at_10: float = 0.95  # validation floor with re-ranking (exact indices need 1.0)
    tune_search: bool = True  # the gate may raise nprobe / re-rank to reach the floor (False: fail instead)
    keep_versions: int | None = 5  # versions kept after publishing (CURRENT and its predecessor always)
    publish: bool = True  # point CURRENT at the new version when validation passes
    max_removed_fraction: float = 0.5  # refuse to publish (the version is removed, CURRENT untouched) a build
    # without more than this fraction of the live version's products: a truncated export on a full-rebuild night;
    # 1.0 allows any

    def __post_init__(self) -> None:
        if self.nprobe is not None and self.nprobe < 1:  # it was published as the version's search default
            raise ValueError(f"nprobe must be at least 1 (leave it unset for the plan's default), got {self.nprobe}")
        if not 0.0 <= self.min_recall_at_10 <= 1.0:  # above 1 no build could pass (0: no recall floor)
            raise ValueError(f"min_recall_at_10 (--min-recall) must lie in [0, 1], got {self.min_recall_at_10}")
        if self.keep_versions is not None and self.keep_versions < 1:  # it failed after publishing, exit 2
            raise ValueError(f"keep_versions (--keep) must be at least 1, got {self.keep_versions}")
        if not 0.0 <= self.max_removed_fraction <= 1.0:
            raise ValueError("max_removed_fraction (--max-removed) must lie in [0, 1], "
                             f"got {self.max_removed_fraction}")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class BuildJob:
    """The stages of one build over one work folder; `run(stages)` runs (or skips) them in order."""

    def __init__(self, config: IndexBuildConfig) -> None:
        self.config = config
        self.root = Path(config.index_root)
        self.work = Path(config.work_dir) if config.work_dir is not None else self.root / ".work"
        self.embed_dir = self.work / "embed"
        self.results: dict[str, Any] = {}
        self._inputs_key: str | None = None

    # keys: each stage's output depends on these inputs (chained, so a change re-runs what follows)
    def key(self, stage: str) -> str:
        c = self.config
        if self._inputs_key is None:  # hashing the weights once per job
            from model.checkpoint import model_fingerprint

            model = model_fingerprint(c.model)  # weights and preprocessing: what makes the vectors
            self._inputs_key = _key(embed_stage.shards_fingerprint(c.shards_dir), model)
        keys = {"embed": _key(self._inputs_key, c.chunk_rows)}
        keys["plan"] = _key(keys["embed"], c.factory, c.nprobe, c.num_shards, c.memory_budget, c.target_recall,
                            c.add_chunk_rows)
        keys["train"] = _key(keys["plan"], c.seed, c.validation_queries)
        keys["add"] = _key(keys["train"], c.num_shards)
        keys["validate"] = _key(keys["add"], c.min_recall_at_10, c.tune_search)
        keys["publish"] = _key(keys["validate"], c.keep_versions, c.publish)
        return keys[stage]

    def done(self, stage: str) -> dict[str, Any] | None:
        """The stage's recorded result when its output is valid for the current inputs, else None."""
        path = self.embed_dir / embed_stage.DONE if stage == "embed" else self.work / f"{stage}.json"
        record = read_json(path)
        if record is None or record.get("key") != self.key(stage):
            return None
        if stage == "validate" and not (self.root / record["version"] / "manifest.json").is_file():
            return None
        return record

    def need(self, stage: str) -> dict[str, Any]:
        record = self.done(stage)
        if record is None:
            raise StageError(f"stage {stage!r} has no valid output in {self.work}: run it first "
                               f"(e.g. --stages {','.join(STAGES[: STAGES.index(stage) + 1])})")
        return record

    def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any]:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: choose from {','.join(STAGES)}")
        self.work.mkdir(parents=True, exist_ok=True)
        with _locked(self.work / ".lock"):
            for stage in [s for s in STAGES if s in stages]:
                record = self.done(stage)
                if record is not None:
                    logger.info("stage %s: output valid, skipped", stage)
                else:
                    logger.info("stage %s: running", stage)
                    record = getattr(self, f"stage_{stage}")()
                self.results[stage] = record
        return self.results

    def stage_embed(self) -> dict[str, Any]:
        c = self.config
        settings = EmbedSettings(batch_size=c.batch_size, num_workers=c.num_workers, chunk_rows=c.chunk_rows,
                                 device=c.device, precision=c.precision, forward=c.forward, backend=c.backend,
                                 ray_address=c.ray_address,
                                 ray_actors=c.ray_actors, ray_cpus_per_actor=c.ray_cpus_per_actor)
        return embed_stage.run_embed_stage(c.shards_dir, c.model, self.embed_dir, settings, self.key("embed"))

    def vectors(self) -> np.ndarray:
        return np.load(self.embed_dir / embed_stage.VECTORS, mmap_mode="r", allow_pickle=False)

    def stage_plan(self) -> dict[str, Any]:
        c, embedded = self.config, self.need("embed")
        n, dim = int(embedded["embedded"]), int(embedded["dim"])
        if c.factory is None:
            plan = plan_index(n, dim, memory_budget=c.memory_budget, target_recall=c.target_recall,
                              num_shards=c.num_shards, chunk_rows=c.add_chunk_rows)
        else:
            plan = plan_from_factory(c.factory, n, dim)
        if c.nprobe is not None:
            plan = IndexPlan(**{**plan.to_json(), "nprobe": int(c.nprobe)})
        estimate = check_memory(plan, n, dim, c.memory_budget, num_shards=c.num_shards, chunk_rows=c.add_chunk_rows)
        budget = "none" if c.memory_budget is None else format_bytes(c.memory_budget)
        logger.info("plan for %d x %d: %s (nprobe %d, re-rank x%d); memory estimate: peak %s (train %s, add %s, "
                    "resident %s), budget %s", n, dim, plan.factory, plan.nprobe, plan.rerank_factor,
                    format_bytes(estimate.peak), format_bytes(estimate.train), format_bytes(estimate.add),
                    format_bytes(estimate.resident), budget)
        record = {"key": self.key("plan"), "n": n, "dim": dim, "plan": plan.to_json(), "memory": estimate.to_json()}
        write_json(self.work / "plan.json", record)
        return record

    def plan(self) -> IndexPlan:
        return IndexPlan(**self.need("plan")["plan"])

    def query_rows(self, n: int) -> np.ndarray:
        """Validation queries: a seeded sample of rows, held out of the training sample."""
        return sample_rows(n, self.config.validation_queries, self.config.seed + 1)

    def stage_train(self) -> dict[str, Any]:
        vectors, plan = self.vectors(), self.plan()
        queries = self.query_rows(len(vectors))
        exclude = queries if len(vectors) - len(queries) >= plan.train_size else None
        index = train_index(vectors, plan, self.config.seed, exclude=exclude, use_gpu=self.config.use_gpu)
        folder = self.work / "train"
        folder.mkdir(exist_ok=True)
        faiss.write_index(index, str(folder / ".trained.faiss.tmp"))
        os.replace(folder / ".trained.faiss.tmp", folder / "trained.faiss")
        record = {"key": self.key("train"), "factory": plan.factory, "held_out_queries": exclude is not None}
        write_json(self.work / "train.json", record)
        return record

    def stage_add(self) -> dict[str, Any]:
        c, vectors = self.config, self.vectors()
        self.need("train")
        trained = faiss.read_index(str(self.work / "train" / "trained.faiss"))
        products = embed_stage.load_products(self.embed_dir)
        numbers = assign_shards([p.product_id for p in products], c.num_shards)
        folder, key = self.work / "add", self.key("add")
        folder.mkdir(exist_ok=True)
        counts, written = [], 0
        assigner = None  # a fine quantizer's centroids, prepared once for every shard's CPU add
        for s in range(c.num_shards):
            marker = read_json(folder / f"shard-{s:03d}.json")
            if marker is not None and marker.get("key") == key and (folder / f"shard-{s:03d}.faiss").is_file():
                logger.info("add: shard %d of %d already filled (%d vectors), skipped", s + 1, c.num_shards,
                            marker["count"])
                counts.append(int(marker["count"]))
                continue
            if assigner is None:
                assigner = CoarseAssigner.for_index(trained)
            shard = fill_shard(trained, vectors, np.flatnonzero(numbers == s), chunk=c.add_chunk_rows,
                               use_gpu=c.use_gpu, assigner=assigner)
            faiss.write_index(shard, str(folder / f".shard-{s:03d}.faiss.tmp"))
            os.replace(folder / f".shard-{s:03d}.faiss.tmp", folder / f"shard-{s:03d}.faiss")
            write_json(folder / f"shard-{s:03d}.json", {"key": key, "count": int(shard.ntotal)})
            logger.info("add: shard %d of %d filled with %d vectors", s + 1, c.num_shards, shard.ntotal)
            counts.append(int(shard.ntotal))
            written += 1
            maybe_fail("add", written)
        record = {"key": key, "counts": counts}
        write_json(self.work / "add.json", record)
        return record

    def stage_validate(self) -> dict[str, Any]:
        c, vectors, plan, embedded = self.config, self.vectors(), self.plan(), self.need("embed")
        self.need("add")
        products = embed_stage.load_products(self.embed_dir)
        digests = np.load(self.embed_dir / embed_stage.DIGESTS, allow_pickle=False)
        from model.data import load_shards_manifest

        fields = {
            "model_fingerprint": embedded["model_fingerprint"], "model_path": embedded["model_path"],
            "dim": int(vectors.shape[1]), "factory": plan.factory, "plan": plan.to_json(),
            "search_defaults": {"nprobe": plan.nprobe, "rerank_factor": plan.rerank_factor},
            "sharding": {"scheme": "sha1(product_id)[:8] mod num_shards", "num_shards": c.num_shards},
            "build_config": json.loads(json.dumps(asdict(c), default=str)),
            "catalog": load_shards_manifest(c.shards_dir).get("report", {}),
            "embedding": {k: embedded[k] for k in ("records", "embedded", "bad_images", "last_run") if k in embedded},
            "memory_estimate": self.need("plan")["memory"],
        }
        queries = self.query_rows(len(vectors))
        product_ids = [p.product_id for p in products]

        def check(version: Any) -> dict:
            report = validate_version(version, vectors, product_ids, exact=plan.is_exact, query_rows=queries,
                                      min_recall_at_10=c.min_recall_at_10, tune=c.tune_search,
                                      model_fingerprint=embedded["model_fingerprint"])
            return {"validation": report, "search_defaults": report["search_defaults"]}  # maybe tuned

        shards = [self.work / "add" / f"shard-{s:03d}.faiss" for s in range(c.num_shards)]
        path = write_built_version(self.root, shards=shards, products=products, vectors=vectors, fields=fields,
                                   digests=digests, check=check)
        logger.info("validated and wrote index version %s (%s, %d vectors)", path, plan.factory, len(vectors))
        record = {"key": self.key("validate"), "version": path.name}
        write_json(self.work / "validate.json", record)
        return record

    def stage_publish(self) -> dict[str, Any]:
        name = self.need("validate")["version"]
        if self.config.publish:
            product_ids = [p.product_id for p in embed_stage.load_products(self.embed_dir)]
            try:
                check_removed_from_live(self.root, product_ids, self.config.max_removed_fraction, name)
            except ValidationFailed:  # like a failed gate, nothing is left: no unpublished version for rollback
                remove_version(self.root, name)
                raise
        pruned = publish_version(self.root, name, self.config.keep_versions) if self.config.publish else []
        record = {"key": self.key("publish"), "version": name, "published": self.config.publish, "pruned": pruned}
        write_json(self.work / "publish.json", record)
        return record


def check_removed_from_live(root: str | Path, product_ids: Sequence[str], max_fraction: float, name: str) -> None:
    """ValidationFailed when more than `max_fraction` of the live version's products are not among `product_ids`
    (the guard `index update` has: a full rebuild from a truncated export published a version without most of the
    shop). Nothing live, or a live version that does not open (this build is its repair): no check."""
    from indexer.version import current_version_path, open_version

    try:
        with open_version(current_version_path(root), shards=()) as live:  # catalog only: no Faiss shard loaded
            removed = removed_from_live(live, product_ids, max_fraction)
            count, base = live.count, live.name
    except VersionError as err:
        logger.info("publish: no live version to compare with (%s)", err)
        return
    if removed is not None:
        raise ValidationFailed(
            f"the new version {name} lacks {removed} of the {count} products of the live version {base} "
            f"({removed / count:.0%}, over the limit of {max_fraction:.0%}): not published; is the export complete "
            "and the images folder there? Pass --max-removed 1 to publish it anyway",
            {"removed": removed, "live": count})


def root_lock(index_root: str | Path) -> Any:
    """The lock of the index root's default work folder, held by a build there and by an update of the root: two
    such jobs at once published in the order they finished, whichever catalog each read (an update overlapping
    a long full rebuild was overwritten by it, or overwrote it)."""
    work = Path(index_root) / ".work"
    work.mkdir(parents=True, exist_ok=True)
    return _locked(work / ".lock")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"another build or update is running in {path.parent} (it holds {path}); "
                             "run this one when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_index(config: IndexBuildConfig, stages: Sequence[str] = STAGES) -> Path:
    """Run the build job's stages; returns the path of the validated version (CURRENT's when published)."""
    results = BuildJob(config).run(stages)
    name = (results.get("validate") or results.get("publish") or {}).get("version")
    if name is None:
        return Path(config.work_dir) if config.work_dir is not None else Path(config.index_root) / ".work"
    return Path(config.index_root) / name


def clean_work(config: IndexBuildConfig) -> None:
    """Delete every stage output in the work folder, under its lock: a StageError when a build is running there
    (`--fresh` deleted the running build's outputs and lock file, and the two builds then ran at once)."""
    work = BuildJob(config).work
    if not work.is_dir():
        return
    with _locked(work / ".lock"):
        for entry in work.iterdir():
            if entry.name == ".lock":  # kept: a build starting now must still find it locked
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
