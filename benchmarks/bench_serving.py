"""How fast is the gRPC query service compared with Faiss alone? Vector, image and batch queries.

Index: 1M clustered synthetic unit vectors, dim 128, "IVF1024,PQ32" (nprobe 16, 2 shards), built
once with indexer.build into work/bench_serving/index (reused when it is already there). Model:
--model, else an untrained model of the demo's architecture (4-layer ViT, width 128, input 80x64,
embedding dim 128): speed does not depend on the weights, and the vectors are synthetic anyway.

Measured, in one run, on the same index and parameters (nprobe 16, top_k 10, one Faiss thread per
call as the server runs it):
- Search by vector through gRPC (a `vitrine serve` process, raw stubs with prebuilt requests from
  client threads in this process, one connection per thread) at concurrency 1, 8, 32: QPS, p50, p99;
  and the same through `vitrine serve --processes 2` (`--processes`: worker processes sharing the port);
- the same queries in-process at the same concurrency: raw Faiss (`index.search`, k=10) and the
  engine's whole Searcher (Faiss + exact re-rank of 100 candidates + catalog lookups);
- the ceiling of the transport: the same client against a no-op gRPC server (a separate process
  answering every Search with one prebuilt 10-hit response, no parsing, no search), at the same
  concurrency: no Python gRPC service can answer faster with this client on these cores;
- the same vector searches through the server's HTTP/JSON gateway (`--http-port`; proto3 JSON bodies
  posted to /v1/search, one keep-alive connection per client thread, answers parsed), against gRPC;
- Search by image (mini-catalog JPEGs) at concurrency 16 with and without micro-batching;
- one BatchSearch of 64 vectors against 64 sequential Search calls (20 interleaved rounds, medians),
  and the floor of the batch: the Faiss search of those 64 vectors alone (k = the re-rank candidates,
  on all cores as the server's batch runs it);
- CPU time per call from /proc: of the server, of the no-op server, of this process's in-process Faiss
  loop; with them, the bound on gRPC / Faiss that remains with the client on another machine (a server
  spends at least Faiss's CPU plus the no-op transport's CPU on each call).

Every load thread (like every server request thread) runs Faiss on one OpenMP thread: OpenMP's
thread count is a per-thread setting, so each thread sets its own.

Run: `python benchmarks/bench_serving.py` (index build about 10 minutes the first time on 2
cores, then about 5 minutes). Writes benchmarks/results/bench_serving.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH_ROUNDS = 20  # interleaved rounds of (64 sequential Search calls, one BatchSearch of 64)
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, summarize_times, time_repeated, write_result  # noqa: E402
from engine.candidates import omp_threads  # noqa: E402
from engine.client import VisualSearchClient  # noqa: E402
from engine.search import RERANK_DEPTH, Searcher  # noqa: E402
from engine.types import SearchQuery, SearchRequest  # noqa: E402
from indexer.version import IndexVersion, current_version_path, open_version  # noqa: E402
from model.catalog import Product  # noqa: E402
from protos.vitrine.v1 import search_pb2, search_pb2_grpc  # noqa: E402


def ensure_model(work: Path, model: Path | None) -> tuple[Path, str]:
    """The checkpoint to serve: --model, else an untrained model of the demo architecture (same cost per image)."""
    if model is not None:
        return model, str(model)
    target = work / "model"
    source = "untrained model.networks.ModelConfig() (the demo architecture: ViT depth 4, width 128, 80x64, dim 128)"
    if not (target / "model_card.json").exists():
        import torch

        from model.checkpoint import save_checkpoint
        from model.networks import ModelConfig, create_model

        torch.manual_seed(0)
        card = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {}, "metrics": {}}
        save_checkpoint(target, create_model(ModelConfig()), card)
    return target, source


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """Unit vectors around `clusters` random centres (made in chunks to bound memory)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ensure_index(work: Path, model_dir: Path, args: argparse.Namespace) -> Path:
    """The version under work/index (built when missing or built with other settings)."""
    from indexer.build import build_index_from_vectors
    from model.embedder import Embedder

    root = work / "index"
    fingerprint = Embedder.load(model_dir).fingerprint
    with contextlib.suppress(Exception), open_version(current_version_path(root)) as version:
        if (version.count, version.dim, version.factory, version.model_fingerprint) == (
                args.n, args.dim, args.factory, fingerprint):
            return version.path
    shutil.rmtree(root, ignore_errors=True)
    xb = clustered(args.n, args.dim, seed=1)
    products = [Product(product_id=f"p{i}", title=f"product {i}", category=f"c{i % 50}", brand=f"b{i % 20}",
                        price=float(1 + i % 200), currency="EUR", in_stock=bool(i % 4), image_url="", attributes={},
                        split=None) for i in range(args.n)]
    start = time.perf_counter()
    path = build_index_from_vectors(xb, products, root, fingerprint, model_dir, args.factory, nprobe=args.nprobe,
                                    num_shards=2, min_recall_at_10=0.0, validation_queries=64)
    print(f"built {args.factory} over {args.n} x {args.dim} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process `pid` and its descendants (the worker processes of
    `--processes`); None where /proc is not there (not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += process_cpu_s(int(child)) or 0.0
        return total
    except (OSError, IndexError, ValueError):
        return None


SERVER_PIDS: dict[int, int] = {}  # port -> pid of the server process answering on it (for CPU accounting)


@contextlib.contextmanager
def server_process(work: Path, flags: list[str]) -> Iterator[int]:
    """A `vitrine serve` process on a free port (stderr to work/server.log); yields the port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = int(flags[flags.index("--processes") + 1]) if "--processes" in flags else 1
    offset = (work / "server.log").stat().st_size if (work / "server.log").is_file() else 0
    log = open(work / "server.log", "a")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "vitrine", "serve", "--index-root", str(work / "index"),
                                "--port", str(port), "--no-watch", "--faiss-threads", "1", *flags],
                               env=env, stderr=log, cwd=REPO)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            deadline = time.monotonic() + 600.0
            while True:  # fail fast when the server process dies (bad flags, model/index mismatch)
                if process.poll() is not None:
                    log.flush()
                    tail = (work / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the server exited with {process.returncode} before it was ready; "
                                       f"end of {work / 'server.log'}:\n{tail}")
                try:
                    client.wait_ready(timeout_s=2.0)
                    log.flush()
                    with open(work / "server.log", "rb") as text:  # every worker loaded, not only the one asked
                        text.seek(offset)
                        if text.read().count(b"SERVING index version") >= workers:
                            break
                    time.sleep(0.5)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        SERVER_PIDS[port] = process.pid
        yield port
    finally:
        SERVER_PIDS.pop(port, None)
        process.terminate()
        process.wait(60)
        log.close()


NOOP_SERVER = """
import sys
from concurrent import futures
import grpc
payload = open(sys.argv[2], "rb").read()
def search(request, context):
    return payload
handler = grpc.method_handlers_generic_handler(
    "vitrine.v1.VisualSearch", {"Search": grpc.unary_unary_rpc_method_handler(search)})  # bytes in, bytes out
server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


@contextlib.contextmanager
def noop_server_process(work: Path, response: bytes) -> Iterator[int]:
    """A gRPC server process answering every VisualSearch.Search with `response` (serialized); yields the port."""
    port = free_port()
    (work / "noop_server.py").write_text(NOOP_SERVER)
    (work / "noop_response.bin").write_bytes(response)
    process = subprocess.Popen([sys.executable, str(work / "noop_server.py"), str(port),
                                str(work / "noop_response.bin")])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.close()
        SERVER_PIDS[port] = process.pid
        yield port
    finally:
        SERVER_PIDS.pop(port, None)
        process.terminate()
        process.wait(60)


def run_load(call: Callable[[int], object], concurrency: int, total: int, server_port: int | None = None) -> dict:
    """`total` calls of call(i) from `concurrency` threads: QPS, p50 and p99 latency (ms), and the CPU time
    per call of this (client) process and, given `server_port`, of the server process on that port."""
    latencies: list[float] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        faiss.omp_set_num_threads(1)  # per thread, as in the server's request threads
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            call(i)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    server_pid = SERVER_PIDS.get(server_port) if server_port is not None else None
    server_cpu = process_cpu_s(server_pid) if server_pid is not None else None
    client_cpu = time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_after = process_cpu_s(server_pid) if server_pid is not None else None
    lat = np.asarray(latencies) * 1e3
    result = {"qps": total / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
              "requests": total, "concurrency": concurrency, "client_cpu_ms_per_call": client_cpu / total * 1e3}
    if server_cpu is not None and server_after is not None:
        result["server_cpu_ms_per_call"] = (server_after - server_cpu) / total * 1e3
    return result


class Clients:
    """One channel (one TCP connection) per client thread, as separate clients would have: with several
    server processes on one port, the kernel spreads connections, not requests."""

    def __init__(self, port: int, count: int = 32) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(count)]
        self.stubs = [search_pb2_grpc.VisualSearchStub(channel) for channel in self.channels]
        self._local = threading.local()
        self._next = iter(range(1 << 62))
        self._lock = threading.Lock()

    def stub(self) -> search_pb2_grpc.VisualSearchStub:
        """This thread's stub."""
        if not hasattr(self._local, "stub"):
            with self._lock:
                self._local.stub = self.stubs[next(self._next) % len(self.stubs)]
        return self._local.stub

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class HttpClients:
    """One keep-alive HTTP connection per client thread to the gateway; each call parses its JSON answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()

    def search(self, body: bytes) -> dict:
        import http.client
        import json

        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        return answer


def json_requests(xq: np.ndarray) -> list[bytes]:
    import json

    return [json.dumps({"vector": {"values": q.tolist()}, "top_k": 10}).encode() for q in xq]


def vector_requests(xq: np.ndarray) -> list[search_pb2.SearchRequest]:
    return [search_pb2.SearchRequest(vector=search_pb2.Vector(values=q.tolist()), top_k=10) for q in xq]


def bench_vectors(port: int, multi_port: int, noop_port: int, http_port: int, version: IndexVersion,
                  xq: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """gRPC Search by vector (one server process, and `--processes`) vs the no-op gRPC ceiling, the HTTP/JSON
    gateway, in-process Faiss and in-process Searcher, per concurrency; every client thread has its own
    connection."""
    server, multi, noop = Clients(port), Clients(multi_port), Clients(noop_port)
    gateway, bodies = HttpClients(http_port), json_requests(xq)
    requests = vector_requests(xq)
    n = len(requests)
    params = faiss.SearchParametersIVF()
    params.nprobe = args.nprobe
    searcher = Searcher(version, lambda images, deadline: np.zeros((0, version.dim), np.float32))
    plain = [SearchRequest(SearchQuery(vector=q), top_k=10) for q in xq]

    def faiss_call(i: int) -> None:
        for shard in version.shards:
            shard.search(xq[i % n][None, :], 10, params=params)

    rows = []
    for clients in (server, multi, noop):  # warm-up
        run_load(lambda i, c=clients: c.stub().Search(requests[i % n], timeout=30), 32, 320)
    run_load(lambda i: gateway.search(bodies[i % n]), 8, 160)
    for concurrency in (1, 8, 32):
        total = args.requests if concurrency > 1 else args.requests // 2
        row = {"concurrency": concurrency,
               "grpc": run_load(lambda i: server.stub().Search(requests[i % n], timeout=30), concurrency, total,
                                port),
               "grpc_processes": run_load(lambda i: multi.stub().Search(requests[i % n], timeout=30), concurrency,
                                          total, multi_port),
               "grpc_noop": run_load(lambda i: noop.stub().Search(requests[i % n], timeout=30), concurrency, total,
                                     noop_port),
               "http": run_load(lambda i: gateway.search(bodies[i % n]), concurrency, total),
               "faiss_inprocess": run_load(faiss_call, concurrency, total),
               "searcher_inprocess": run_load(lambda i: searcher.search(plain[i % n]), concurrency, total)}
        row["ratio_grpc_to_faiss"] = row["grpc"]["qps"] / row["faiss_inprocess"]["qps"]
        row["ratio_grpc_to_searcher"] = row["grpc"]["qps"] / row["searcher_inprocess"]["qps"]
        row["ratio_noop_to_faiss"] = row["grpc_noop"]["qps"] / row["faiss_inprocess"]["qps"]
        row["ratio_grpc_to_noop"] = row["grpc"]["qps"] / row["grpc_noop"]["qps"]
        row["ratio_processes_to_faiss"] = row["grpc_processes"]["qps"] / row["faiss_inprocess"]["qps"]
        row["ratio_http_to_grpc"] = row["http"]["qps"] / row["grpc"]["qps"]
        noop_cpu = row["grpc_noop"].get("server_cpu_ms_per_call")
        faiss_cpu = row["faiss_inprocess"]["client_cpu_ms_per_call"]
        if noop_cpu is not None:  # a server's cores must do at least Faiss's work and the transport's per call
            row["bound_separate_client"] = faiss_cpu / (faiss_cpu + noop_cpu)
        print(row, flush=True)
        rows.append(row)
    for clients in (server, multi, noop):
        clients.close()
    return rows


def bench_batch(port: int, version: IndexVersion, xq: np.ndarray, args: argparse.Namespace) -> dict:
    """One BatchSearch of 64 vectors against 64 sequential Search calls (QPS of each), and Faiss alone."""
    from indexer.validate import rerank_candidates

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = search_pb2_grpc.VisualSearchStub(channel)
    requests = vector_requests(xq[:64])
    batch = search_pb2.BatchSearchRequest(requests=requests)
    calls = {"sequential": lambda: [stub.Search(r, timeout=30) for r in requests],
             "batch": lambda: stub.BatchSearch(batch, timeout=60)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(BATCH_ROUNDS + 1):  # interleaved, so the machine's drift hits both alike; round 0 warms up
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    sequential, batched = summarize_times(times["sequential"]), summarize_times(times["batch"])
    channel.close()
    params = faiss.SearchParametersIVF()
    params.nprobe = args.nprobe
    k = max(rerank_candidates(10, version.rerank_factor, version.count),  # what the server fetches
            min(version.count, RERANK_DEPTH))
    with omp_threads(os.cpu_count() or 1):  # as the server's batch (faiss_batch_threads 0: all cores)
        floor = time_repeated(lambda: [shard.search(xq[:64], k, params=params) for shard in version.shards],
                              repeats=BATCH_ROUNDS)
    result = {"sequential_qps": 64 / sequential["median_s"], "batch_qps": 64 / batched["median_s"],
              "faiss_batch_qps": 64 / floor["median_s"], "faiss_k": k,
              "sequential_s": sequential, "batch_s": batched, "faiss_batch_s": floor}
    result["ratio"] = result["batch_qps"] / result["sequential_qps"]
    result["ratio_faiss_floor"] = result["faiss_batch_qps"] / result["sequential_qps"]
    print(result, flush=True)
    return result


def bench_images(work: Path, flags: list[str], images: list[bytes], total: int) -> dict:
    """Search by image at concurrency 16 through a server started with `flags`."""
    with server_process(work, flags) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)])
        stub = search_pb2_grpc.VisualSearchStub(channel)
        requests = [search_pb2.SearchRequest(image=data, top_k=10) for data in images]
        run_load(lambda i: stub.Search(requests[i % len(requests)], timeout=60), 16, 64)  # warm-up
        result = run_load(lambda i: stub.Search(requests[i % len(requests)], timeout=60), 16, total)
        channel.close()
    print(flags, result, flush=True)
    return result


def mini_catalog_images(limit: int = 200) -> list[bytes]:
    folder = REPO / "data" / "mini-catalog" / "images"
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:limit]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128, help="vector size; must be the model's embedding size")
    parser.add_argument("--factory", default="IVF1024,PQ32")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000, help="calls per vector measurement")
    parser.add_argument("--image-requests", type=int, default=400, help="calls per image measurement")
    parser.add_argument("--processes", type=int, default=2, help="server processes of the multi-process measurement")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench_serving")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to serve (default: an untrained model of the demo architecture, dim 128)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(1)
    model_dir, model_source = ensure_model(args.work, args.model)
    from model.checkpoint import load_model_card

    model_dim = int(load_model_card(model_dir)["embedding_dim"])
    if model_dim != args.dim:
        parser.error(f"the model {model_dir} embeds in {model_dim} dimensions but --dim is {args.dim}: "
                     f"pass --dim {model_dim}")
    version_path = ensure_index(args.work, model_dir, args)
    xq = clustered(1000, args.dim, seed=2)
    results: dict = {"model": model_source, "version": version_path.name}
    flags = ["--workers", "32", "--max-concurrent-rpcs", "1000"]
    http_port = free_port()
    with server_process(args.work, [*flags, "--http-port", str(http_port)]) as port, \
            open_version(version_path) as version:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a real 10-hit answer for the no-op server
            response = search_pb2_grpc.VisualSearchStub(channel).Search(vector_requests(xq[:1])[0], timeout=30)
        with noop_server_process(args.work, response.SerializeToString()) as noop_port, \
                server_process(args.work, [*flags, "--processes", str(args.processes)]) as multi_port:
            results["vector"] = bench_vectors(port, multi_port, noop_port, http_port, version, xq, args)
        results["batch"] = bench_batch(port, version, xq, args)
    images = mini_catalog_images()
    results["image"] = {
        "micro_batching": bench_images(args.work, ["--workers", "32", "--max-batch", "32", "--max-wait-ms", "5"],
                                       images, args.image_requests),
        "no_batching": bench_images(args.work, ["--workers", "32", "--no-micro-batch"], images, args.image_requests)}
    results["image"]["ratio"] = results["image"]["micro_batching"]["qps"] / results["image"]["no_batching"]["qps"]
    write(args, results)
    return 0


def write(args: argparse.Namespace, results: dict) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    lines = [f"{args.factory}, {args.n:,} x {args.dim} clustered synthetic, nprobe {args.nprobe}, top_k 10, "
             f"2 shards; model: {results['model']}.", "",
             f"| concurrency | gRPC QPS | p50 ms | p99 ms | gRPC QPS, {args.processes} processes | p50 ms | p99 ms "
             "| in-process Faiss QPS | in-process Searcher QPS | no-op gRPC QPS (ceiling) | gRPC / Faiss "
             f"| {args.processes} processes / Faiss | gRPC / Searcher | no-op / Faiss | gRPC / no-op |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["vector"]:
        g, m = row["grpc"], row["grpc_processes"]
        lines.append(f"| {row['concurrency']} | {g['qps']:.0f} | {g['p50_ms']:.2f} | {g['p99_ms']:.2f} "
                     f"| {m['qps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} "
                     f"| {row['faiss_inprocess']['qps']:.0f} | {row['searcher_inprocess']['qps']:.0f} "
                     f"| {row['grpc_noop']['qps']:.0f} | {row['ratio_grpc_to_faiss']:.2f} "
                     f"| {row['ratio_processes_to_faiss']:.2f} | {row['ratio_grpc_to_searcher']:.2f} "
                     f"| {row['ratio_noop_to_faiss']:.2f} | {row['ratio_grpc_to_noop']:.2f} |")
    lines += ["", "The same searches through the server's HTTP/JSON gateway (one server process, keep-alive "
              "connections, JSON parsed by the client):", "",
              "| concurrency | HTTP/JSON QPS | p50 ms | p99 ms | gRPC QPS | HTTP / gRPC |", "|---|---|---|---|---|---|"]
    for row in results["vector"]:
        h = row["http"]
        lines.append(f"| {row['concurrency']} | {h['qps']:.0f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} "
                     f"| {row['grpc']['qps']:.0f} | {row['ratio_http_to_grpc']:.2f} |")
    if all("server_cpu_ms_per_call" in row["grpc_noop"] for row in results["vector"]):
        lines += ["", "CPU time per call (user + system, from /proc; the in-process Faiss column is the benchmark "
                  "process's own CPU per search, its load loop included). The bound: with the client on another "
                  "machine, a server's cores must still spend Faiss's CPU and at least the no-op server's CPU on "
                  "every call, so gRPC / Faiss <= Faiss CPU / (Faiss CPU + no-op server CPU).", "",
                  "| concurrency | gRPC server ms | no-op server ms | in-process Faiss ms | gRPC client ms "
                  "| bound on gRPC / Faiss, client elsewhere |", "|---|---|---|---|---|---|"]
        for row in results["vector"]:
            lines.append(f"| {row['concurrency']} | {row['grpc']['server_cpu_ms_per_call']:.3f} "
                         f"| {row['grpc_noop']['server_cpu_ms_per_call']:.3f} "
                         f"| {row['faiss_inprocess']['client_cpu_ms_per_call']:.3f} "
                         f"| {row['grpc']['client_cpu_ms_per_call']:.3f} | {row['bound_separate_client']:.2f} |")
    b, im = results["batch"], results["image"]
    lines += ["", "| measurement | value |", "|---|---|",
              f"| 64 sequential Search calls | {b['sequential_qps']:.0f} queries/s |",
              f"| one BatchSearch of 64 vectors | {b['batch_qps']:.0f} queries/s ({b['ratio']:.1f}x) |",
              f"| Faiss alone, the 64 vectors in one call (k {b['faiss_k']}, all cores) | "
              f"{b['faiss_batch_qps']:.0f} queries/s ({b['ratio_faiss_floor']:.1f}x the sequential calls) |",
              f"| image search, concurrency 16, micro-batching | {im['micro_batching']['qps']:.1f} images/s "
              f"(p50 {im['micro_batching']['p50_ms']:.0f} ms, p99 {im['micro_batching']['p99_ms']:.0f} ms) |",
              f"| image search, concurrency 16, no batching | {im['no_batching']['qps']:.1f} images/s "
              f"(p50 {im['no_batching']['p50_ms']:.0f} ms, p99 {im['no_batching']['p99_ms']:.0f} ms) |",
              f"| micro-batching speed-up | {im['ratio']:.2f}x |"]
    markdown = "\n".join(lines)
    write_result("bench_serving", config, results, markdown)
    plot(results)
    print(markdown)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["vector"]
    conc = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("grpc", "gRPC Search"), ("grpc_processes", "gRPC Search, several server processes"),
                       ("http", "HTTP/JSON gateway, one process"),
                       ("grpc_noop", "no-op gRPC server (ceiling)"),
                       ("searcher_inprocess", "in-process Searcher"), ("faiss_inprocess", "in-process Faiss")):
        ax.plot(conc, [r[key]["qps"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("queries per second")
    ax.set_title("Search by vector, 1M IVF-PQ, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "bench_serving.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())


