"""examples/nightly/nightly.sh, the nightly job, run as cron would run it: four nights on a changing catalog.

Night 1 has no index: a full rebuild (ingest + build). Night 2 applies the changed export as an
incremental update. Night 3's export is broken (no rows): the job fails and CURRENT stays. Night 4 is
forced to rebuild fully and prunes old ingests. Real mini-catalog images, the committed default model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.version import list_versions, open_current, read_current
from tests.indexer_fixtures import MINI, REPO, catalog_rows, write_catalog_rows

SCRIPT = REPO / "examples" / "nightly" / "nightly.sh"
pytestmark = pytest.mark.timeout(600)


def night(tmp_path: Path, csv_path: Path, **env: str) -> subprocess.CompletedProcess:
    """One run of the nightly script with the test's settings (never on its weekly rebuild day)."""
    variables = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                 "CATALOG_CSV": str(csv_path), "IMAGES": str(MINI / "images"), "VITRINE_HOME": str(tmp_path / "home"),
                 "REBUILD_WEEKDAY": "8", "KEEP": "3", "PYTHONPATH": str(REPO), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=variables, capture_output=True, text=True, timeout=500)


def test_four_nights(tmp_path: Path) -> None:
    if shutil.which("vitrine", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the vitrine command is not installed in this environment (pip install -e .)")
    rows = catalog_rows(46)
    header, first, later = rows[0], rows[1:41], rows[41:]
    write_catalog_rows(tmp_path / "export1.csv", [header, *first])
    run = night(tmp_path, tmp_path / "export1.csv")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "full rebuild" in run.stdout and "done: CURRENT is" in run.stdout
    root = tmp_path / "home" / "index"
    night1 = read_current(root)
    with open_current(root) as version:
        assert version.count == len(first) - sum(not (MINI / "images" / f"{r[0]}.jpg").is_file() for r in first)
        assert version.manifest["validation"]["passed"]

    write_catalog_rows(tmp_path / "export2.csv", [header, *first[3:], *later])  # 3 gone, 5 new
    run = night(tmp_path, tmp_path / "export2.csv")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"incremental update of {night1}" in run.stdout
    night2 = read_current(root)
    with open_current(root) as version:
        report = version.manifest["update"]
        assert night2 != night1 and report["base_version"] == night1
        assert report["deleted"] == 3 and report["added"] == sum((MINI / "images" / f"{r[0]}.jpg").is_file()
                                                                 for r in later)
        assert version.internal_id(first[0][0]) is None and version.internal_id(first[5][0]) is not None

    write_catalog_rows(tmp_path / "export3.csv", [header])  # a broken export: no products at all
    run = night(tmp_path, tmp_path / "export3.csv")
    assert run.returncode != 0 and "no usable rows" in run.stderr
    assert read_current(root) == night2, "a failed night leaves what is served alone"
    last = run.stdout.strip().splitlines()[-1]  # the log ends saying so, not with the command's error alone
    assert f"FAILED (exit {run.returncode}) at index update: CURRENT is still {night2}" in last

    for _ in range(2):  # two forced full rebuilds: three ingests made, the two newest kept
        run = night(tmp_path, tmp_path / "export2.csv", FULL_REBUILD="1")
        assert run.returncode == 0 and "full rebuild" in run.stdout, run.stderr[-3000:]
    assert len(list((tmp_path / "home" / "shards").iterdir())) == 2
    assert len(list_versions(root)) <= 3 and read_current(root) not in (night1, night2)
    report = json.loads(run.stdout[run.stdout.index("{"):run.stdout.rindex("}") + 1])  # ingest's report
    assert report["records"] > 0 and report["failed_downloads"] == 0


def test_without_a_catalog_it_says_what_to_set(tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "CATALOG_CSV": ""}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and "set CATALOG_CSV" in run.stderr
    run = night(tmp_path, tmp_path / "missing.csv")
    assert run.returncode == 2 and "does not exist" in run.stdout


def test_help_prints_the_settings_and_arguments_are_refused(tmp_path: Path) -> None:
    """`nightly.sh --help` ignored its argument and ran the job (or failed for want of CATALOG_CSV)."""
    env = {**os.environ, "CATALOG_CSV": "", "VITRINE_HOME": str(tmp_path / "home")}
    run = subprocess.run(["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "CATALOG_CSV" in run.stdout and "REBUILD_WEEKDAY" in run.stdout
    run = subprocess.run(["bash", str(SCRIPT), "--full"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "takes no arguments" in run.stderr
    assert not (tmp_path / "home").exists()


def test_images_default_to_the_csv_folder(tmp_path: Path) -> None:
    """Without IMAGES the full rebuild's ingest stopped with "--images is needed" (an image_pattern catalog), though
    the script documents the CSV's folder as the default."""
    fake = tmp_path / "fake-vitrine"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {tmp_path / 'calls'}\n"
                    f"mkdir -p {tmp_path / 'home' / 'index'} {tmp_path / 'home' / 'shards'}\n"
                    f"echo v1 > {tmp_path / 'home' / 'index' / 'CURRENT'}\n")
    fake.chmod(0o755)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "products.csv").write_text("id\n1\n")
    env = {**os.environ, "CATALOG_CSV": str(tmp_path / "export" / "products.csv"), "VITRINE": str(fake),
           "VITRINE_HOME": str(tmp_path / "home")}
    env.pop("IMAGES", None)
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ingest = (tmp_path / "calls").read_text().splitlines()[0]
    assert ingest.startswith("ingest") and f"--images {tmp_path / 'export'}" in ingest
