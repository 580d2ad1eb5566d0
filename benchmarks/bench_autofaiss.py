"""Does vitrine's index build beat autofaiss on the same vectors under the same memory budget?

For each size N (``--sizes``), the same dim-256 vectors are indexed twice, each build in its own process
(its peak RSS is its own VmHWM, sampled by the parent from /proc every 0.5 s, imports included):

- **vitrine**: `indexer.build.build_index_from_vectors` with ``memory_budget`` = ``--memory-budget`` (the
  planner picks the factory string; then train, add, write the version with its catalog store and float16
  vectors, validate). Its build time therefore includes writing and validating a whole version;
- **autofaiss** (`autofaiss.build_index`, run by ``--autofaiss-python``, a separate virtualenv: autofaiss
  pins numpy<2 and its 2.18 release does not run on faiss 1.15) with ``current_memory_available`` =
  ``--memory-budget`` and ``max_index_memory_usage`` = the memory vitrine's version needs to search:
  (a) vitrine's Faiss index bytes (what vitrine searches *without* re-ranking), and (b) those plus its
  float16 vectors (what vitrine holds to re-rank). Its build time includes its own parameter tuning.

Recall@10 (tie-aware, against exact inner-product search) on 1,000 held-out queries, at each tool's
default search parameters: vitrine's manifest nprobe (tuned by its gate), plain and with its float16
re-rank (the engine's candidate count);
autofaiss's tuned ``index_param``. **The fair pairs**: vitrine plain vs autofaiss (a) (equal index
memory), and vitrine re-ranked vs autofaiss (b) (equal memory including the re-rank vectors).

Data: real embeddings where we have them (``--real-embeddings``, default: the default model's embeddings
of the 44,441 catalog images that `bench_relevance` caches in work/relevance-cache), for sizes that fit
after holding out the queries; beyond that the clustered synthetic vectors of `bench_index_build`.

Set-up of the autofaiss virtualenv (once; kept out of vitrine's own environment)::

    python3.11 -m venv /work/venv-autofaiss
    /work/venv-autofaiss/bin/pip install "autofaiss==2.18.0" "faiss-cpu==1.7.4" "numpy<2" "pyarrow<18"

Usage (resumable per size: sizes already in the results JSON are skipped; --force redoes them. Within a size
each finished build is kept in --work-dir/n<N>/ with its result, so a run cut short resumes at the build it was
in)::

    python -m benchmarks.bench_autofaiss --autofaiss-python /work/venv-autofaiss/bin/python --sizes 10000
    python -m benchmarks.bench_autofaiss --autofaiss-python /work/venv-autofaiss/bin/python \\
        --sizes 10000,100000,1000000

After a change to vitrine's builder, ``--redo-vitrine --sizes N`` rebuilds only vitrine's index of a size whose
work folder was kept (``--keep-work``) and reuses the autofaiss builds when vitrine's index bytes (their budget)
are unchanged; otherwise they are rebuilt too.

Writes results/autofaiss.{json,md,png}; logs of each build in --work-dir/n<N>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_index_build import DIM, QUERIES, make_vectors  # noqa: E402

NAME = "autofaiss"
K = 10
AUTOFAISS_SETUP = ('python3.11 -m venv /work/venv-autofaiss && /work/venv-autofaiss/bin/pip install '
                   '"autofaiss==2.18.0" "faiss-cpu==1.7.4" "numpy<2" "pyarrow<18"')

AUTOFAISS_CHILD = """
import json, sys, time
from autofaiss import build_index
src, out, max_mem, avail, cores = sys.argv[1:6]
start = time.perf_counter()
index, infos = build_index(embeddings=src, index_path=out + "/knn.index", index_infos_path=out + "/infos.json",
                           max_index_memory_usage=max_mem, current_memory_available=avail, metric_type="ip",
                           nb_cores=int(cores), verbose=20)
if index is None:
    sys.exit("autofaiss.build_index returned no index (see its log above)")
print(json.dumps({"seconds": time.perf_counter() - start, "infos": infos}))
"""


def check_autofaiss(python: str | None) -> str:
    """The autofaiss interpreter, or SystemExit saying how to set it up."""
    if not python:
        raise SystemExit(f"bench_autofaiss: --autofaiss-python is required (a virtualenv with autofaiss); set one "
                         f"up with:\n  {AUTOFAISS_SETUP}")
    probe = subprocess.run([python, "-c", "import autofaiss, faiss; from importlib.metadata import version; "
                            "print(f'autofaiss {version(\"autofaiss\")}, faiss {faiss.__version__}')"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"bench_autofaiss: {python} cannot import autofaiss ({probe.stderr.strip()[-300:]}); "
                         f"set it up with:\n  {AUTOFAISS_SETUP}")
    return probe.stdout.strip()


def default_real_embeddings() -> Path | None:
    """The default model's cached catalog embeddings (written by bench_relevance), if this checkout has them."""
    from model.checkpoint import default_model_path, model_fingerprint

    fingerprint = model_fingerprint(default_model_path())[:16]
    found = sorted((REPO / "work" / "relevance-cache").glob(f"emb-{fingerprint}-*.npy"))
    return found[0] if found else None


def load_vectors(n: int, real: Path | None, seed: int = 0) -> tuple[Any, Any, str]:
    """(base (n, DIM), queries (QUERIES, DIM), description): real rows when they suffice, else synthetic."""
    import numpy as np

    if real is not None:
        rows = np.load(real, mmap_mode="r")
        if rows.ndim == 2 and rows.shape[1] == DIM and len(rows) >= n + QUERIES:
            order = np.random.default_rng(seed).permutation(len(rows))
            pick = lambda ids: np.ascontiguousarray(rows[np.sort(ids)], dtype=np.float32)  # noqa: E731
            xb, xq = pick(order[QUERIES : QUERIES + n]), pick(order[:QUERIES])
            for x in (xb, xq):
                x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            return xb, xq, f"real embeddings {real.name} ({len(rows):,} rows; {QUERIES} held out as queries)"
    xb, xq = make_vectors(n, seed)
    return xb, xq, "clustered synthetic (n/100 Gaussian clusters, bench_index_build.make_vectors)"


def run_child(argv: list[str], log: Path, timeout_s: float, threads: int) -> tuple[dict, int]:
    """Run a build process; (its last stdout line as JSON, its peak RSS in bytes from wait4). stderr -> log.

    OMP_NUM_THREADS = threads for both builders (Faiss and the BLAS under numpy).
    """
    out = log.with_suffix(".out")
    with open(out, "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)})
        deadline = time.monotonic() + timeout_s
        peak = 0
        while True:
            peak = max(peak, _vm_hwm(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                raise RuntimeError(f"{argv[0]} ran past {timeout_s:.0f} s and was killed; log: {log}")
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"build failed (exit {proc.returncode}); log {log}:\n{tail}")
    # ru_maxrss of a child includes the RSS its forked copy of this (large) process had before exec, so
    # the peak is the child's own high-water mark (VmHWM, sampled every 0.5 s) where /proc has it
    return json.loads(out.read_text().strip().splitlines()[-1]), peak or int(usage.ru_maxrss) * 1024


def _vm_hwm(pid: int) -> int:
    """Peak resident bytes of a running process's own address space (Linux /proc; 0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def placeholder_products(n: int) -> list:
    """n catalog rows with ids "0".."n-1" and nothing else: what a version needs beside synthetic vectors."""
    from model.catalog import Product

    return [Product(product_id=str(i), title="", category="c", brand="", price=None, currency="", in_stock=True,
                    image_url="", attributes={}, split=None) for i in range(n)]


def child_vitrine(vectors_path: Path, out: Path, budget: int, threads: int, min_recall: float) -> dict:
    """The vitrine build (runs in its own process): plan under the budget, train, add, write, validate.

    min_recall is the validation gate's floor (0: no gate); a build that misses it fails the size.
    """
    import faiss
    import numpy as np

    from indexer.build import build_index_from_vectors
    from indexer.plan import IndexPlan, estimate_memory
    from indexer.version import open_version

    faiss.omp_set_num_threads(threads)
    xb = np.load(vectors_path, mmap_mode="r")
    products = placeholder_products(len(xb))
    start = time.perf_counter()
    path = build_index_from_vectors(xb, products, out / "index", "0" * 64, out, memory_budget=budget,
                                    min_recall_at_10=min_recall, validation_queries=256, publish=False)
    seconds = time.perf_counter() - start
    with open_version(path) as version:
        return {"seconds": seconds, "factory": version.factory, "search_defaults": version.manifest["search_defaults"],
                "index_bytes": sum((path / s["path"]).stat().st_size for s in version.manifest["shards"]),
                "vectors_f16_bytes": (path / "vectors.f16.npy").stat().st_size, "version": str(path),
                "plan": version.manifest["plan"],  # the planner's estimate beside the measured peak RSS:
                "memory_estimate": estimate_memory(IndexPlan(**version.manifest["plan"]), *xb.shape).to_json()}


def build_autofaiss(python: str, emb_dir: Path, out: Path, max_index_bytes: int, budget: int, threads: int,
                    timeout_s: float) -> dict:
    """One autofaiss build with max_index_memory_usage = max_index_bytes, in the autofaiss virtualenv."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = [f"{max(1, max_index_bytes // 2**10)}KB", f"{budget // 2**20}MB"]  # autofaiss: K/M/G are powers of 1024
    result, peak = run_child([python, "-c", AUTOFAISS_CHILD, str(emb_dir), str(out), *sizes, str(threads)],
                             out / "build.log", timeout_s, threads)
    infos = result.get("infos") or {}
    return {"seconds": result["seconds"], "peak_rss_bytes": peak, "max_index_memory_usage": sizes[0],
            "factory": infos.get("index_key"), "index_param": infos.get("index_param", ""),
            "index_bytes": (out / "knn.index").stat().st_size, "index_path": str(out / "knn.index"), "infos": infos}


def _resumed(path: Path) -> dict | None:
    """A build finished by an earlier run of this size with the same inputs (resume), or None."""
    from indexer.embed import read_json

    result = read_json(path)
    if result is not None:
        say(f"resuming: the {path.name.split('.')[0]} build is already done ({path}); delete that file or pass "
            "--force to rebuild it")
    return result


def _finished(path: Path, result: dict) -> dict:
    """Record a finished build so that a rerun after an interruption skips it (written atomically)."""
    from indexer.embed import write_json

    write_json(path, result)
    return result


def search_recall(index: Any, xq: Any, xb: Any, D_true: Any, k: int) -> tuple[float, float]:
    """(recall@k, ms per query) of a Faiss index searched as it is (its parameters already set)."""
    from indexer.validate import recall_from_truth

    start = time.perf_counter()
    _, I = index.search(xq, k)  # noqa: E741
    return recall_from_truth(D_true, xq, xb, I), 1000 * (time.perf_counter() - start) / len(xq)


def measure_recalls(xb: Any, xq: Any, vitrine: dict, autofaiss: dict[str, dict]) -> dict:
    """Recall@10 and ms/query of vitrine (plain, re-ranked) and each autofaiss index, at default parameters."""
    import faiss

    from indexer.validate import exact_topk, recall_from_truth, search_reranked
    from indexer.version import open_version

    D_true, _ = exact_topk(xb, xq, K)
    out: dict[str, Any] = {}
    with open_version(vitrine["version"]) as version:
        start = time.perf_counter()
        _, I = version.search(xq, K)  # noqa: E741
        out["vitrine_plain"] = {"recall_at_10": recall_from_truth(D_true, xq, xb, I),
                                "ms_per_query": 1000 * (time.perf_counter() - start) / len(xq)}
        start = time.perf_counter()
        _, I = search_reranked(version, xq, K)  # noqa: E741
        out["vitrine_reranked"] = {"recall_at_10": recall_from_truth(D_true, xq, xb, I),
                                   "ms_per_query": 1000 * (time.perf_counter() - start) / len(xq)}
    for name, built in autofaiss.items():
        index = faiss.read_index(built["index_path"])
        if built["index_param"]:
            faiss.ParameterSpace().set_index_parameters(index, built["index_param"])
        recall, ms = search_recall(index, xq, xb, D_true, K)
        out[name] = {"recall_at_10": recall, "ms_per_query": ms}
    return out


def run_size(n: int, args: argparse.Namespace, budget: int, real: Path | None) -> dict:
    """Both builds and the recalls at one size; the row written to the results JSON."""
    import numpy as np

    from benchmarks.common import git_sha

    work = Path(args.work_dir) / f"n{n}"
    xb, xq, data = load_vectors(n, real)
    digest = hashlib.sha256(xb.tobytes()).hexdigest()[:16]
    # what every build of this folder depends on: a rerun with other vectors or settings starts it over
    inputs = (f"vectors {digest}, budget {budget}, threads {args.threads}, vitrine floor {args.vitrine_min_recall}, "
              f"autofaiss {args.autofaiss_python}")
    stamp = work / "emb" / "inputs.txt"
    if args.redo_vitrine:  # keep the finished autofaiss builds (their byte targets are checked below)
        (work / "vitrine.result.json").unlink(missing_ok=True)
    if args.force or not stamp.is_file() or stamp.read_text().strip() != inputs:
        shutil.rmtree(work, ignore_errors=True)
        (work / "emb").mkdir(parents=True)
        np.save(work / "emb" / "part0.npy", xb)
        stamp.write_text(inputs)
    row: dict[str, Any] = {"n": n, "dim": DIM, "data": data, "queries": QUERIES, "memory_budget_bytes": budget,
                           "threads": args.threads, "git_sha": git_sha(),
                           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "vectors_sha256": digest}
    say(f"[n={n:,}] data: {data}; vitrine build (log {work / 'vitrine.log'}) ...")
    vitrine = _resumed(work / "vitrine.result.json")
    if vitrine is None:
        shutil.rmtree(work / "v", ignore_errors=True)
        built, peak = run_child([sys.executable, __file__, "--child", str(work / "emb" / "part0.npy"), str(work / "v"),
                                 str(budget), str(args.threads), str(args.vitrine_min_recall)], work / "vitrine.log",
                                args.timeout_s, args.threads)
        vitrine = _finished(work / "vitrine.result.json", {**built, "peak_rss_bytes": peak})
    row["vitrine"] = vitrine
    peak = vitrine["peak_rss_bytes"]
    say(f"[n={n:,}] vitrine: {vitrine['factory']} in {vitrine['seconds']:.1f} s, peak RSS {peak / 2**20:.0f} MiB, "
        f"index {vitrine['index_bytes'] / 2**20:.1f} MiB (+{vitrine['vectors_f16_bytes'] / 2**20:.1f} MiB float16)")
    targets = {"autofaiss_index_memory": vitrine["index_bytes"],
               "autofaiss_serving_memory": vitrine["index_bytes"] + vitrine["vectors_f16_bytes"]}
    row["autofaiss"] = {}
    for name, max_bytes in targets.items():
        say(f"[n={n:,}] {name}: autofaiss build, max_index_memory_usage {max_bytes / 2**20:.1f} MiB "
            f"(log {work / name / 'build.log'}) ...")
        done = _resumed(work / f"{name}.result.json")  # its max bytes follow from the resumed vitrine build
        target = f"{max(1, max_bytes // 2**10)}KB"
        if done is not None and done["max_index_memory_usage"] != target:
            say(f"[n={n:,}] {name}: that build had max_index_memory_usage {done['max_index_memory_usage']}, the "
                f"vitrine build now needs {target}: rebuilding it")
            done = None
        if done is None:
            shutil.rmtree(work / name, ignore_errors=True)
            done = _finished(work / f"{name}.result.json",
                              build_autofaiss(args.autofaiss_python, work / "emb", work / name, max_bytes, budget,
                                              args.threads, args.timeout_s))
        row["autofaiss"][name] = done
        say(f"[n={n:,}] {name}: {done['factory']} ({done['index_param']}) in {done['seconds']:.1f} s, peak RSS "
            f"{done['peak_rss_bytes'] / 2**20:.0f} MiB, index {done['index_bytes'] / 2**20:.1f} MiB")
    say(f"[n={n:,}] recall@10 on {QUERIES} held-out queries ...")
    row["search"] = measure_recalls(xb, xq, row["vitrine"], row["autofaiss"])
    say(f"[n={n:,}] " + ", ".join(f"{k} {v['recall_at_10']:.3f}" for k, v in row["search"].items()))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return row


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["Same vectors (dim 256), same memory budget; recall@10 (tie-aware) vs exact search on 1,000 held-out "
             "queries at each tool's default search parameters. Fair pairs: vitrine plain vs autofaiss at vitrine's "
             "index bytes; vitrine re-ranked vs autofaiss at vitrine's index + float16 bytes.", "",
             "| N | data | builder | index (search params) | build s | peak RSS MiB | index MiB | recall@10 "
             "| ms/query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["n"]):
        data = "real" if r["data"].startswith("real") else "synthetic"
        v, s = r["vitrine"], r["search"]
        params = f"nprobe {v['search_defaults']['nprobe']}"
        for label, key, extra in (("vitrine", "vitrine_plain", 0),
                                  ("vitrine + f16 re-rank", "vitrine_reranked", v["vectors_f16_bytes"])):
            rerank = f", re-rank x{v['search_defaults']['rerank_factor']}" if extra else ""
            lines.append(f"| {r['n']:,} | {data} | {label} | {v['factory']} ({params}{rerank}) | {v['seconds']:.1f} | "
                         f"{v['peak_rss_bytes'] / mib:.0f} | {(v['index_bytes'] + extra) / mib:.1f} | "
                         f"{s[key]['recall_at_10']:.3f} | {s[key]['ms_per_query']:.3f} |")
        for key, label in (("autofaiss_index_memory", "autofaiss @ vitrine index bytes"),
                           ("autofaiss_serving_memory", "autofaiss @ vitrine index + f16 bytes")):
            a = r["autofaiss"][key]
            lines.append(f"| {r['n']:,} | {data} | {label} | {a['factory']} ({a['index_param'] or '-'}) | "
                         f"{a['seconds']:.1f} | {a['peak_rss_bytes'] / mib:.0f} | {a['index_bytes'] / mib:.1f} | "
                         f"{s[key]['recall_at_10']:.3f} | {s[key]['ms_per_query']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Build seconds and recall@10 against N (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["n"])
    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ns, [r["vitrine"]["seconds"] for r in rows], "o-", color="C0", label="vitrine")
    for key, style, color in (("autofaiss_index_memory", "s--", "C1"), ("autofaiss_serving_memory", "^:", "C2")):
        label = key.replace("_", " ")
        left.plot(ns, [r["autofaiss"][key]["seconds"] for r in rows], style, color=color, label=label)
        right.plot(ns, [r["search"][key]["recall_at_10"] for r in rows], style, color=color, label=label)
    right.plot(ns, [r["search"]["vitrine_plain"]["recall_at_10"] for r in rows], "o-", color="C0",
               label="vitrine plain (vs autofaiss index memory)")
    right.plot(ns, [r["search"]["vitrine_reranked"]["recall_at_10"] for r in rows], "o-.", color="C3",
               label="vitrine re-ranked (vs autofaiss serving memory)")
    left.set(xscale="log", yscale="log", xlabel="vectors (dim 256)", ylabel="build seconds")
    right.set(xscale="log", xlabel="vectors (dim 256)", ylabel="recall@10", ylim=(0, 1.02))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_rows(path: Path) -> list[dict]:
    """Rows of an earlier run (resume), or none."""
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("results", {}).get("rows", []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--memory-budget", default="4GB", help="memory budget given to both builders")
    parser.add_argument("--autofaiss-python", default=None, help="python of the virtualenv holding autofaiss")
    parser.add_argument("--real-embeddings", default="auto",
                        help="(n, 256) .npy of real embeddings used where they suffice; 'auto': the default "
                             "model's cache in work/relevance-cache; 'none': synthetic only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both builders")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600, help="longest one build may run")
    parser.add_argument("--work-dir", default=str(REPO / "work" / "bench_autofaiss"), help="vectors, indices, logs")
    parser.add_argument("--keep-work", action="store_true", help="keep each size's vectors and indices")
    parser.add_argument("--force", action="store_true", help="redo sizes already in results/autofaiss.json")
    parser.add_argument("--redo-vitrine", action="store_true",
                        help="rebuild vitrine's index for --sizes (also those in the JSON) and keep the finished "
                             "autofaiss builds of the size's work folder (kept by --keep-work or an interrupted run) "
                             "when vitrine's index bytes, their budget, did not change")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--vitrine-min-recall", type=float, default=0.95,
                        help="vitrine's validation floor of re-ranked recall@10 (default 0.95, as `vitrine index "
                             "build`: the gate tunes nprobe / re-rank to reach it; 0: the plan's untuned defaults)")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        vectors, out, budget, threads, min_recall = args.child
        print(json.dumps(child_vitrine(Path(vectors), Path(out), int(budget), int(threads), float(min_recall)),
                         default=str))
        return 0
    from benchmarks.common import RESULTS_DIR, write_result
    from indexer.plan import parse_bytes

    autofaiss_version = check_autofaiss(args.autofaiss_python)
    budget = parse_bytes(args.memory_budget)
    real = None if args.real_embeddings == "none" else (
        default_real_embeddings() if args.real_embeddings == "auto" else Path(args.real_embeddings))
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    rows = load_rows(out_dir / f"{NAME}.json")
    config = {**vars(args), "memory_budget_bytes": budget, "autofaiss_version": autofaiss_version,
              "real_embeddings": str(real) if real else None}
    measured = 0
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        if any(r["n"] == n for r in rows) and not (args.force or args.redo_vitrine):
            say(f"[n={n:,}] already in {out_dir / NAME}.json: skipped (--force redoes it)")
            continue
        row = run_size(n, args, budget, real)
        rows = [r for r in rows if r["n"] != n] + [row]
        measured += 1
        write_result(NAME, config, {"rows": rows}, markdown_table(rows), out_dir)  # after every size: resumable
    if measured:
        plot(rows, out_dir / f"{NAME}.png")
    if rows:
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
