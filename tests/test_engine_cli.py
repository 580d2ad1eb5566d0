"""`vitrine serve` and `vitrine query` as processes: settings from a file, the environment and flags,
JSON logs, the metrics endpoint, BatchSearch from the command line, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from engine_fixtures import build_engine_index, free_port

from engine.client import VisualSearchClient

pytestmark = pytest.mark.timeout(400)


def test_serve_with_file_env_and_flags_then_query(tmp_path: Path) -> None:
    index = build_engine_index(tmp_path)
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nindex_root = "{index.index_root}"\nport = 1\nmax_batch = 4\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "VITRINE_METRICS_PORT": str(metrics_port), "VITRINE_PORT": "2", "VITRINE_LOG_JSON": "true"}
    server = subprocess.Popen([sys.executable, "-m", "vitrine", "serve", "--config", str(config), "--port", str(port),
                               "--grace-s", "1"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:  # the flag's port wins
            client.wait_ready(timeout_s=240.0)
        query = [sys.executable, "-m", "vitrine", "query", "--target", f"127.0.0.1:{port}"]
        info = subprocess.run([*query, "--info"], env=env, capture_output=True, text=True, timeout=180)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["version"] == index.version_path.name
        first, second = (index.products[i].product_id for i in (3, 4))
        folder = index.model_dir.parent
        for pid in (first, second):
            (folder / f"{pid}.jpg").write_bytes(index.images[pid])
        batch = subprocess.run([*query, "--image", str(folder / f"{first}.jpg"), "--image",
                                str(folder / f"{second}.jpg"), "--top-k", "2", "--brand", ""],
                               env=env, capture_output=True, text=True, timeout=180)
        assert batch.returncode == 0, batch.stderr
        assert batch.stdout.count("== ") == 2 and batch.stdout.count("2 hits from index version") == 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'vitrine_requests_total{code="OK",method="BatchSearch"} 1.0' in metrics
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r.get("rpc") == "BatchSearch" and r.get("code") == "OK" and "latency_ms" in r for r in records)
    configured = next(r["message"] for r in records if r["message"].startswith("configuration:"))
    assert f"'port': {port}" in configured and "'max_batch': 4" in configured
    assert records[-1]["message"] == "stopped"


def test_serve_with_two_processes_on_one_port(tmp_path: Path) -> None:
    """`--processes 2`: two worker processes share the gRPC port and the HTTP gateway's port; connections reach
    both; SIGTERM stops all cleanly."""
    import grpc
    import numpy as np

    from protos.vitrine.v1 import search_pb2, search_pb2_grpc

    index = build_engine_index(tmp_path)
    port, metrics_port = free_port(), free_port()
    while (second := free_port()) == metrics_port + 1 or second == port:
        pass
    metrics_port = second - 1  # workers serve metrics on metrics_port + 0 and + 1: both must be free
    while (http_port := free_port()) in (port, metrics_port, metrics_port + 1):
        pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vitrine", "serve", "--index-root", str(index.index_root),
                               "--port", str(port), "--processes", "2", "--metrics-port", str(metrics_port),
                               "--http-port", str(http_port), "--grace-s", "1"], env=env, stderr=subprocess.PIPE,
                              text=True)
    try:
        for worker in (0, 1):  # each worker's metrics endpoint answers once it is loaded
            deadline = time.monotonic() + 240
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + worker}/metrics", timeout=5).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"worker {worker} never served metrics"
                    assert server.poll() is None, server.communicate()[1]
                    time.sleep(0.2)
        request = search_pb2.SearchRequest(vector=search_pb2.Vector(values=np.ones(index.dim).tolist()), top_k=3)
        for _ in range(24):  # one connection each: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert len(search_pb2_grpc.VisualSearchStub(ch).Search(request, timeout=30).hits) == 3
        body = json.dumps({"vector": {"values": np.ones(index.dim).tolist()}, "top_k": 3}).encode()
        for _ in range(24):  # the HTTP gateway: one connection per call, spread over the workers too
            call = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/search", data=body,
                                          headers={"Content-Type": "application/json"})
            assert len(json.loads(urllib.request.urlopen(call, timeout=30).read())["hits"]) == 3
        counts = []
        for worker in (0, 1):
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + worker}/metrics", timeout=10).read()
            line = next((ln for ln in text.decode().splitlines()
                         if ln.startswith('vitrine_requests_total{code="OK",method="Search"}')), "x 0")
            counts.append(float(line.split()[-1]))
        assert sum(counts) == 48 and min(counts) > 0, counts  # both processes answered
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, stderr
    assert "2 worker processes" in stderr and "[worker 1]" in stderr and "all 2 workers stopped" in stderr


def test_serve_with_processes_fails_when_its_workers_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "empty-index").mkdir()  # no CURRENT: every worker refuses to start
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-m", "vitrine", "serve", "--index-root", str(tmp_path / "empty-index"),
                             "--port", str(free_port()), "--processes", "2"], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 1, result.stderr
    assert "CURRENT" in result.stderr and "exited with status 1; stopping the others" in result.stderr


def test_a_second_server_on_a_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    """Every server set SO_REUSEPORT, so a second `vitrine serve` on a busy port (another index, an old
    deployment) started silently and took a share of the first one's connections. Only the workers of
    --processes share a port now; a single server on a port in use (gRPC, HTTP or metrics) exits 1 saying so."""
    index = build_engine_index(tmp_path)
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    serve = [sys.executable, "-m", "vitrine", "serve", "--index-root", str(index.index_root), "--grace-s", "1"]
    first = subprocess.Popen([*serve, "--port", str(port), "--http-port", str(http_port), "--metrics-port",
                              str(metrics_port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            client.wait_ready(timeout_s=240.0)
        for flags, said in ((["--port", str(port)], f"cannot bind 127.0.0.1:{port}"),
                            (["--port", str(free_port()), "--http-port", str(http_port)],
                             f"cannot bind the HTTP gateway to 127.0.0.1:{http_port}"),
                            (["--port", str(free_port()), "--metrics-port", str(metrics_port)],
                             f"cannot serve metrics on 127.0.0.1:{metrics_port}")):
            second = subprocess.run([*serve, *flags], env=env, capture_output=True, text=True, timeout=240)
            assert second.returncode == 1 and said in second.stderr, second.stderr[-2000:]
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
