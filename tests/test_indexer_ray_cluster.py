"""The Ray backend on a real multi-node Ray cluster: `vitrine index build --backend ray --ray-address HEAD`.

Two Ray nodes are started the way an operator starts them on two machines (`ray start --head`, then
`ray start --address HEAD` on the second), here both on this host with one CPU each, so each node
can hold exactly one of the two embedding actors. The nightly job runs as its own driver process
through the CLI, joins the cluster, embeds on both nodes and runs every later stage; its embeddings
equal the local backend's (to within float16 rounding, as in tests/test_indexer_ray.py) and
`done.json` says how many records each node embedded.

What this does not show: nodes on separate machines (the shards folder is on a shared filesystem by
construction here), or a GPU node. Skips when ray is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.job import IndexBuildConfig, build_index
from indexer.version import open_current
from tests.engine_fixtures import free_port
from tests.indexer_fixtures import REPO, corrupt_record, make_inputs
from tests.test_indexer_ray import BAD_RECORD, N_IMAGES, RAY_TIMEOUT_S, assert_same_embeddings, needs_ray

pytestmark = [needs_ray, pytest.mark.timeout(RAY_TIMEOUT_S)]
RAY = Path(sys.executable).with_name("ray")  # the `ray` command of this environment
NODE_START_S = 120.0
CHUNK = 4  # 10 chunks (Ray blocks) of 4 records, so both actors get some while the other is busy


def alive_nodes(address: str, env: dict[str, str]) -> int:
    """How many nodes the cluster at `address` reports alive (asked from a separate driver process)."""
    code = (f"import ray, logging; ray.init(address={address!r}, logging_level=logging.ERROR); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to a blocking `ray start`: the node drains and stops the Ray processes it started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A two-node Ray cluster (head + one worker node, 1 CPU each); yields the head's address and the environment
    its drivers use. Every Ray process gets its own HOME and no RAY_* variable of this process: Ray keeps user
    state there (~/.ray/auth_token) and a local ray.init switches token authentication on for its process
    (RAY_AUTH_MODE=token), and a head and its drivers must agree on both; the test neither reads the user's
    state nor leaves its own."""
    if not RAY.is_file():
        pytest.skip(f"the ray command is not installed beside {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="vray"))  # short: Ray's socket paths must stay under 107 characters
    address = f"127.0.0.1:{free_port()}"
    (temp / "home").mkdir()
    # no RAY_* settings of this process either: a local ray.init (tests/test_indexer_ray.py) sets RAY_AUTH_MODE=token
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_USAGE_STATS_ENABLED": "0",
           "HOME": str(temp / "home")}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    logs = [temp / "head.log", temp / "worker.log"]

    def started(index: int, what: str) -> None:
        if nodes[index].poll() is not None or time.monotonic() > deadline:
            tail = logs[index].read_text(errors="replace")[-3000:] if logs[index].is_file() else ""
            raise AssertionError(f"the {what} did not start (exit status {nodes[index].poll()}):\n{tail}")

    with open(logs[0], "w") as log:
        nodes = [subprocess.Popen([str(RAY), "start", "--head", "--port", address.split(":")[1],
                                   "--include-dashboard", "false", "--temp-dir", str(temp), *common], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + NODE_START_S
        while alive_nodes(address, env) < 1:
            started(0, "head node")
            time.sleep(1)
        with open(logs[1], "w") as log:
            nodes.append(subprocess.Popen([str(RAY), "start", "--address", address, *common], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        while alive_nodes(address, env) < 2:
            started(1, "worker node")
            time.sleep(1)
        yield address, env
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shards, checkpoint): 40 mini-catalog images, record BAD_RECORD corrupted on disk (as test_indexer_ray)."""
    shards, checkpoint = make_inputs(tmp_path_factory.mktemp("ray-cluster"), N_IMAGES)
    corrupt_record(shards, BAD_RECORD)
    return shards, checkpoint


def test_the_nightly_job_embeds_on_every_node_of_a_ray_cluster(cluster: tuple[str, dict[str, str]],
                                                               inputs: tuple[Path, Path], tmp_path: Path) -> None:
    address, env = cluster
    shards, checkpoint = inputs
    local = tmp_path / "local"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=local, chunk_rows=CHUNK,
                                 batch_size=8, num_workers=0, validation_queries=10), ("embed",))
    root = tmp_path / "ray"
    argv = [sys.executable, "-m", "vitrine", "index", "build", "--shards", str(shards), "--model", str(checkpoint),
            "--index-root", str(root), "--backend", "ray", "--ray-address", address, "--ray-actors", "2",
            "--chunk-rows", str(CHUNK), "--batch-size", "4", "--validation-queries", "10"]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=RAY_TIMEOUT_S - 60, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_same_embeddings(local / ".work" / "embed", root / ".work" / "embed")
    done = json.loads((root / ".work" / "embed" / "done.json").read_text())
    assert done["bad_records"] == [BAD_RECORD] and done["embedded"] == N_IMAGES - 1
    per_node = done["last_run"]["records_per_node"]
    assert len(per_node) == 2 and all(count > 0 for count in per_node.values()), per_node
    assert sum(per_node.values()) >= N_IMAGES  # every record (a retried task may return some twice)
    assert "node(s)" in run.stderr and "2 node(s)" in run.stderr
    with open_current(root) as version:
        assert version.count == N_IMAGES - 1 and version.manifest["build_config"]["backend"] == "ray"
        assert version.manifest["validation"]["recall_at_10"] == 1.0
        assert version.manifest["embedding"]["last_run"]["records_per_node"] == per_node
