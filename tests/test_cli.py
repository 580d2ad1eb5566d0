"""The `vitrine` command line: help texts, argument errors, and the whole path through real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitrine.cli import create_parser, main
from vitrine.demo import DemoConfig, run_demo

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "data" / "mini-catalog"

SUBCOMMANDS = [["ingest"], ["train"], ["index"], ["index", "build"], ["index", "list"], ["index", "rollback"],
               ["serve"], ["query"],
               ["demo"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_explains_itself(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        create_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vitrine " + " ".join(words))
    assert len(out.splitlines()) > 4


def test_missing_input_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ingest", "--csv", str(tmp_path / "nope.csv"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "out")])
    assert code == 2
    assert "catalog CSV not found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real demo run with a one-epoch model: every stage (ingest, train, index, serve, query) real."""
    work = tmp_path_factory.mktemp("demo")
    summary = run_demo(DemoConfig(work_dir=work, epochs=1, html_queries=5))
    assert summary["queries"] >= 100
    return work


def test_demo_writes_relevance_and_html(demo_work: Path) -> None:
    summary = json.loads((demo_work / "demo_results.json").read_text())
    assert 0.0 <= summary["chance_top1_type"] < summary["top1_relevance_type"] <= 1.0
    page = (demo_work / "results.html").read_text()
    assert page.count('class="row"') == 5
    assert "data:image/jpeg;base64," in page


def test_serve_and_query_processes_by_hand(demo_work: Path) -> None:
    """`vitrine serve` and `vitrine query` as separate processes, as the README shows."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "vitrine", "serve", "--index-root", str(demo_work / "index"),
                               "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        query_id = next(p.stem for p in sorted((MINI / "images").glob("*.jpg")))
        deadline = time.monotonic() + 120
        while True:
            out = subprocess.run([sys.executable, "-m", "vitrine", "query", "--target", f"127.0.0.1:{port}",
                                  "--product-id", query_id, "--top-k", "3", "--timeout", "5"],
                                 capture_output=True, text=True)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.returncode == 0, out.stderr
        assert len([line for line in out.stdout.splitlines() if line.strip()]) >= 4
        image = subprocess.run([sys.executable, "-m", "vitrine", "query", "--target", f"127.0.0.1:{port}",
                                "--image", str(MINI / "images" / f"{query_id}.jpg"), "--top-k", "3"],
                               capture_output=True, text=True, timeout=60)
        assert image.returncode == 0, image.stderr
        assert query_id in image.stdout  # the photo of a catalog product finds that product
        bad = subprocess.run([sys.executable, "-m", "vitrine", "query", "--target", f"127.0.0.1:{port}",
                              "--product-id", "no-such-product"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2
        assert "NOT_FOUND" in bad.stderr and "no-such-product" in bad.stderr
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
