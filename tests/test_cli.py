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

SUBCOMMANDS = [["ingest"], ["annotate"], ["teacher"], ["train"], ["binarize"], ["evaluate"], ["index"],
               ["index", "build"], ["index", "list"], ["index", "rollback"], ["index", "update"],
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


def test_index_update_help_gives_the_live_versions_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """`index update --help` shared index build's texts: --num-shards "(default 1)" where an update keeps the live
    version's shard count, --factory "(default: planned)" where any other than the live one is an error, --gpu
    "train/add on GPU" where an update trains nothing and adds on the CPU."""
    with pytest.raises(SystemExit):
        create_parser().parse_args(["index", "update", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default as many as the live version)" in text and "(default 1)" not in text
    assert "the live version's Faiss factory string" in text and "(default: planned)" not in text
    assert "train/add on GPU" not in text and "seed of the validation queries" in text
    with pytest.raises(SystemExit):
        create_parser().parse_args(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mod S (default 1)" in text and "train/add on GPU" in text
    for words in (["index", "build"], ["index", "update"]):  # what a cron job's exit status means
        with pytest.raises(SystemExit):
            create_parser().parse_args([*words, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Exit status: 0 published; 1 refused" in text and "CURRENT unchanged; 2 bad input" in text


def test_typical_flow_tasks_are_columns_of_the_default_ingest() -> None:
    """The top-level help's `train --tasks category,colour` failed on the shards `vitrine ingest` makes with its
    default column mapping: there is no column 'colour' (it is baseColour)."""
    from model.catalog import CatalogConfig
    from vitrine.cli import DESCRIPTION

    line = next(line for line in DESCRIPTION.splitlines() if "--tasks" in line)
    tasks = line.split("--tasks", 1)[1].split()[0].split(",")
    known = {"category", "brand", *CatalogConfig().attribute_columns}
    assert tasks and set(tasks) <= known, tasks


def test_missing_input_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ingest", "--csv", str(tmp_path / "nope.csv"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "out")])
    assert code == 2
    assert "catalog CSV not found" in capsys.readouterr().err


def test_ingest_without_one_usable_image_fails_and_keeps_the_previous_ingest(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong --images folder made an ingest of 0 records that exited 0 (train and index build failed later, and a
    nightly rebuild went on); with --overwrite it also replaced the good shards of the night before."""
    csv = tmp_path / "styles.csv"
    csv.write_text("".join((MINI / "styles.csv").open(encoding="utf-8").readlines()[:6]), encoding="utf-8")
    out = tmp_path / "shards"
    assert main(["ingest", "--csv", str(csv), "--images", str(MINI / "images"), "--out", str(out)]) == 0
    good = (out / "manifest.json").read_text()
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ingest", "--csv", str(csv), "--images", str(empty), "--out", str(out), "--overwrite"]) == 2
    captured = capsys.readouterr()
    assert "none of the catalog's 5 products has a usable image (5 missing" in captured.err
    assert f"inside {empty} (--images)" in captured.err
    assert json.loads(captured.out)["missing_images"] == 5  # the report still names each problem image
    assert (out / "manifest.json").read_text() == good
    assert not list(tmp_path.glob(".shards.tmp-*")), "the empty attempt is not left behind"


@pytest.mark.parametrize("words", [["ingest", "--csv", "{dir}", "--images", "{dir}", "--out", "{dir}/out"],
                                   ["ingest", "--csv", "{csv}", "--images", "{dir}", "--out", "{dir}/out",
                                    "--catalog-config", "{dir}"],
                                   ["index", "update", "--csv", "{dir}", "--images", "{dir}", "--index-root", "{dir}"],
                                   ["train", "--shards", "{dir}", "--out", "{dir}/out", "--config", "{dir}"]],
                         ids=lambda words: " ".join(w for w in words if not w.startswith("{")))
def test_a_file_argument_that_is_a_folder_is_a_clear_error(words: list[str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--csv exports/` (a folder) raised IsADirectoryError with a traceback; so did a folder as a config file."""
    (tmp_path / "my.csv").write_text("id\n1\n")
    argv = [w.format(dir=tmp_path, csv=tmp_path / "my.csv") for w in words]
    assert main(argv) == 2
    assert f"{tmp_path} is a folder: name a file" in capsys.readouterr().err


def test_index_update_without_a_live_version_is_a_clear_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`vitrine index update` on an index root where nothing is published raised VersionError with a traceback."""
    assert main(["index", "update", "--csv", str(MINI / "styles.csv"), "--images", str(MINI / "images"),
                 "--index-root", str(tmp_path)]) == 2
    assert "CURRENT not found" in capsys.readouterr().err


def test_index_update_on_a_damaged_live_version_points_to_rollback(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An update whose live version has a truncated file said "run `vitrine index build` first", as if nothing had
    ever been published; the way out is a rollback to an intact version (or a full build)."""
    import numpy as np

    from indexer.build import build_index_from_vectors
    from model.catalog import Product

    products = [Product(product_id=str(i), title="", category="", brand="", price=None, currency="", in_stock=True,
                        image_url="", attributes={}, split=None) for i in range(20)]
    vectors = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for name in ("v0", "v1"):
        build_index_from_vectors(vectors, products, tmp_path, "a" * 64, tmp_path, name=name)
    (tmp_path / "v1" / "filters.npz").write_bytes(b"truncated")
    assert main(["index", "update", "--csv", str(MINI / "styles.csv"), "--images", str(MINI / "images"),
                 "--index-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "filters.npz has 9 bytes" in err and "vitrine index rollback --to NAME" in err and "first" not in err
    assert err.startswith("vitrine index update: error: "), "which index command failed, in a nightly log"


def test_a_query_image_that_is_a_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vitrine query --image photos/` raised IsADirectoryError with a traceback (before any connection)."""
    assert main(["query", "--target", "127.0.0.1:9", "--image", str(tmp_path)]) == 2
    assert f"image file {tmp_path} is a folder" in capsys.readouterr().err


def test_index_list_names_a_version_with_a_broken_manifest_and_goes_on(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A half-written manifest.json (a full disk) stopped `index list` with a bare JSON error naming no file."""
    for name, text in (("20260101T000000Z", '{"factory": "IDMap,Flat", "count": 3}'), ("20260102T000000Z", "{bad"),
                       ("20260103T000000Z", '{"factory": "IDMap,Flat", "count": 4}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "count=3" in lines[0] and "count=4" in lines[2]
    assert f"unreadable {tmp_path / '20260102T000000Z' / 'manifest.json'}" in lines[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real demo run with a one-epoch model: every stage (ingest, train, index, serve, query) real."""
    work = tmp_path_factory.mktemp("demo")
    summary = run_demo(DemoConfig(work_dir=work, train=True, epochs=1, html_queries=5))
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


def test_own_catalog_with_other_columns_and_no_split(tmp_path: Path) -> None:
    """The README tour on a user's CSV: other column names, a label column called 'type', no split column."""
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["sku,name,type,brand,price,stock"]
    for i, image in enumerate(sorted((MINI / "images").glob("*.jpg"))[:30]):
        (images / image.name).write_bytes(image.read_bytes())
        rows.append(f"{image.stem},item {i},{'Shirts' if i % 2 else 'Shoes'},acme,{10 + i},{'yes' if i % 3 else 'no'}")
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "cols.json").write_text(json.dumps({
        "id_column": "sku", "image_pattern": "{id}.jpg", "title_column": "name", "category_column": "type",
        "brand_column": "brand", "price_column": "price", "currency": "EUR", "stock_column": "stock",
        "attribute_columns": ["type"], "split_column": None, "overflow_column": "name"}))
    work = tmp_path / "work"
    assert main(["ingest", "--csv", str(tmp_path / "my.csv"), "--images", str(images), "--out", str(work / "shards"),
                 "--catalog-config", str(tmp_path / "cols.json")]) == 0
    assert main(["annotate", "--shards", str(work / "shards"), "--out", str(work / "weak_labels.json")]) == 0
    assert main(["train", "--stage", "pretrain", "--shards", str(work / "shards"), "--weak-labels",
                 str(work / "weak_labels.json"), "--out", str(work / "pretrain"), "--epochs", "1"]) == 0
    bad = ["train", "--shards", str(work / "shards"), "--tasks", "type,brand", "--out", str(work / "bad")]
    assert main([*bad, "--task-weights", "2,x"]) == 2 and main([*bad, "--task-weights", "2,1,1"]) == 2
    assert not (work / "bad").exists()  # refused before anything was written
    assert main(["train", "--shards", str(work / "shards"), "--init-from", str(work / "pretrain"), "--tasks",
                 "type,brand", "--task-weights", "2,1", "--out", str(work / "model"), "--epochs", "1"]) == 0
    assert main(["index", "build", "--shards", str(work / "shards"), "--model", str(work / "model"),
                 "--index-root", str(work / "index")]) == 0
    card = json.loads((work / "model" / "model_card.json").read_text())
    assert card["embedding_dim"] > 0 and set(card["label_maps"]) == {"type", "brand"} and card["init_from"]
    assert card["config"]["task_weights"] == [2.0, 1.0]
    manifest = json.loads(next((work / "index").glob("*/manifest.json")).read_text())
    assert manifest["count"] == 30


def _tiny_shards(tmp_path: Path, n: int = 12, split: bool = True) -> Path:
    """Shards of `n` mini-catalog products under other column names, split train/test (or without a split)."""
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["sku,name,kind,colour,part"]
    for i, image in enumerate(sorted((MINI / "images").glob("*.jpg"))[:n]):
        (images / image.name).write_bytes(image.read_bytes())
        rows.append(f"{image.stem},blue cotton shirt {i},{'Shirts' if i % 2 else 'Shoes'},Blue,"
                    f"{'test' if i % 4 == 0 else 'train'}")
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "cols.json").write_text(json.dumps({
        "id_column": "sku", "image_pattern": "{id}.jpg", "title_column": "name", "category_column": "kind",
        "attribute_columns": ["kind", "colour"], "split_column": "part" if split else None,
        "overflow_column": "name"}))
    assert main(["ingest", "--csv", str(tmp_path / "my.csv"), "--images", str(images), "--out",
                 str(tmp_path / "shards"), "--catalog-config", str(tmp_path / "cols.json")]) == 0
    return tmp_path / "shards"


def test_annotate_that_would_mine_nothing_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --text-fields or --splits name wrote empty weak labels (then a KeyError traceback in pretrain)."""
    shards = _tiny_shards(tmp_path)
    out = tmp_path / "weak.json"
    capsys.readouterr()
    for flags, message in ((["--text-fields", "colour,nosuch"], "--text-fields nosuch: not a field"),
                           (["--splits", "tarin"], "no record of"),
                           (["--min-count", "1000"], "no weak label")):
        assert main(["annotate", "--shards", str(shards), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert main(["annotate", "--shards", str(shards), "--out", str(out), "--text-fields", "title,colour",
                 "--splits", "train", "--min-count", "1", "--head-min-count", "1"]) == 0
    empty = json.loads(out.read_text())
    empty.update(labels=[], clusters={}, products={k: [] for k in empty["products"]})
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    assert main(["train", "--stage", "pretrain", "--shards", str(shards), "--weak-labels", str(tmp_path / "empty.json"),
                 "--out", str(tmp_path / "pre")]) == 2
    assert "hold no label" in capsys.readouterr().err


def test_catalog_without_split_column_is_all_training_for_annotate_and_binarize(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README tour has "split_column": null, then `annotate --splits train` and `binarize` (default --splits
    train): both found no record (annotate wrote empty labels), while `train` trains on records without a split."""
    shards = _tiny_shards(tmp_path, split=False)
    out = tmp_path / "weak.json"
    assert main(["annotate", "--shards", str(shards), "--out", str(out), "--splits", "train", "--min-count", "1"]) == 0
    assert len(json.loads(out.read_text())["products"]) == 12
    capsys.readouterr()
    assert main(["binarize", "--model", str(REPO / "model" / "default"), "--shards", str(shards)]) == 2
    assert "ITQ needs at least 256 images (the embedding size), got 12" in capsys.readouterr().err  # not 0 records


def test_binarize_max_records_below_one_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = _tiny_shards(tmp_path)
    capsys.readouterr()
    assert main(["binarize", "--model", str(REPO / "model" / "default"), "--shards", str(shards),
                 "--max-records", "0"]) == 2  # was a ZeroDivisionError traceback
    assert "--max-records must be >= 1" in capsys.readouterr().err


def test_train_out_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --out notes.txt` (a file) trained, moved the file aside to a hidden name, then raised
    NotADirectoryError with a traceback."""
    shards = _tiny_shards(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", "--shards", str(shards), "--tasks", "kind", "--out", str(tmp_path / "notes.txt"),
                 "--epochs", "1", "--width", "32", "--depth", "1", "--heads", "2", "--embedding-dim", "16"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_annotate_out_that_is_a_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`annotate --out work/` (a folder) mined the labels, then raised IsADirectoryError with a traceback."""
    shards = _tiny_shards(tmp_path)
    (tmp_path / "labels").mkdir()
    assert main(["annotate", "--shards", str(shards), "--out", str(tmp_path / "labels"), "--min-count", "1"]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("words", [["index", "build", "--shards", "{dir}"], ["index", "list"], ["index", "rollback"],
                                   ["index", "update", "--csv", "{csv}", "--images", "{dir}"]], ids=" ".join)
def test_an_index_root_that_is_a_file_is_a_clear_error(words: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--index-root` naming a file raised NotADirectoryError with a traceback (build, list, rollback)."""
    (tmp_path / "root").write_text("x")
    argv = [w.format(dir=tmp_path, csv=MINI / "styles.csv") for w in words]
    assert main([*argv, "--index-root", str(tmp_path / "root")]) == 2
    assert "is a file: name a folder" in capsys.readouterr().err


def test_index_build_model_that_is_a_file_is_a_clear_error(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`index build --model model.pt` (the weights file, not its folder) raised NotADirectoryError with a traceback."""
    (tmp_path / "model.pt").write_bytes(b"x")
    assert main(["index", "build", "--shards", str(tmp_path), "--model", str(tmp_path / "model.pt"),
                 "--index-root", str(tmp_path / "index")]) == 2
    assert "model checkpoint" in capsys.readouterr().err


def test_teacher_work_dir_that_is_a_file_is_a_clear_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`teacher --work-dir` naming a file raised NotADirectoryError with a traceback."""
    (tmp_path / "work").write_text("x")
    assert main(["teacher", "--shards", str(tmp_path), "--out", str(tmp_path / "t.npz"), "--work-dir",
                 str(tmp_path / "work")]) == 2
    assert "is a file: name a folder" in capsys.readouterr().err


def test_index_build_shards_that_are_not_an_ingest_are_a_clear_error(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`index build --shards` on a file or on a folder without an ingest's manifest answered a bare
    "[Errno 2] No such file or directory: '.../manifest.json'"."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for shards, words in (("empty", "run the ingest step (vitrine ingest) first"), ("file", "is a file")):
        assert main(["index", "build", "--shards", str(tmp_path / shards), "--index-root", str(tmp_path / "i")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("flag, what", [("--weak-labels", "--weak-labels file not found"),
                                        ("--init-from", "--init-from checkpoint not found"),
                                        ("--distill-from", "--distill-from teacher logits not found")])
def test_train_inputs_that_are_missing_are_named_before_training(flag: str, what: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A missing --weak-labels file was a bare "[Errno 2] No such file or directory" after the run's banner."""
    shards = _tiny_shards(tmp_path)
    stage = "pretrain" if flag == "--weak-labels" else "finetune"
    assert main(["train", "--stage", stage, "--shards", str(shards), "--tasks", "kind", "--out", str(tmp_path / "m"),
                 flag, str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert what in err and str(tmp_path / "nope") in err and "training:" not in err
    assert not (tmp_path / "m").exists()


def test_index_update_catalog_config_that_is_missing_is_named(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "root").mkdir()
    assert main(["index", "update", "--csv", str(MINI / "styles.csv"), "--images", str(tmp_path), "--index-root",
                 str(tmp_path / "root"), "--catalog-config", str(tmp_path / "shop.json")]) == 2
    assert f"catalog config not found: {tmp_path / 'shop.json'}" in capsys.readouterr().err


def test_demo_work_dir_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --work-dir notes.txt` answered "[Errno 17] File exists: 'notes.txt'"."""
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--work-dir", str(tmp_path / "notes.txt")]) == 2
    assert "is a file: name a folder" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_file_errors_the_commands_do_not_foresee_name_the_path_and_the_problem(tmp_path: Path) -> None:
    from vitrine.cli import describe_os_error

    with pytest.raises(OSError) as missing:
        (tmp_path / "no" / "x").read_text()
    assert describe_os_error(missing.value) == f"{tmp_path / 'no' / 'x'}: no such file or folder"
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError) as in_the_way:
        (tmp_path / "f").mkdir()
    assert describe_os_error(in_the_way.value).startswith(f"{tmp_path / 'f'}: a file is in the way")
    with pytest.raises(OSError) as through_a_file:
        (tmp_path / "f" / "y").write_text("x")
    assert "a part of this path is a file" in describe_os_error(through_a_file.value)
    own = FileExistsError("shards exist with other inputs; pass --overwrite")  # vitrine's own message is kept
    assert describe_os_error(own) == str(own)


def test_teacher_tasks_are_checked_before_the_embedding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vitrine teacher` on a catalog without the default --tasks columns embedded every record with the CNN and
    then failed with sklearn's "Found array with 0 sample(s)"; a single-class task likewise."""
    shards = _tiny_shards(tmp_path)
    capsys.readouterr()
    work = tmp_path / "teacher"
    assert main(["teacher", "--shards", str(shards), "--out", str(tmp_path / "t.npz"), "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "--tasks articleType, baseColour: not a label column" in err and "colour, kind" in err
    assert not (work / "features.npz").exists()  # nothing was embedded
    assert main(["teacher", "--shards", str(shards), "--out", str(tmp_path / "t.npz"), "--work-dir", str(work),
                 "--tasks", "colour"]) == 2
    assert "task 'colour' has 1 class(es)" in capsys.readouterr().err


def test_teacher_on_a_catalog_without_splits_writes_valid_json(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Without held-out records the probe accuracy was NaN, which is not JSON (other languages' parsers refuse
    it); it is null."""
    shards = _tiny_shards(tmp_path, split=False)
    assert main(["teacher", "--shards", str(shards), "--out", str(tmp_path / "t.npz"), "--work-dir",
                 str(tmp_path / "teacher"), "--tasks", "kind"]) == 0
    report = json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert report["tasks"]["kind"] == {"classes": 2, "held_out_accuracy": None} and report["train_records"] == 12
