"""`vitrine serve` and `vitrine query` as processes: settings from a file, the environment and flags,
JSON logs, the metrics endpoint, BatchSearch from the command line, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from engine_fixtures import build_engine_index

from engine.client import VisualSearchClient

pytestmark = pytest.mark.timeout(400)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
