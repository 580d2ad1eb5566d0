"""Rollback: CURRENT goes back to an earlier complete version, atomically, and only to one that opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from indexer.build import build_index_from_vectors
from indexer.errors import VersionError
from indexer.publish import prune_versions
from indexer.rollback import rollback
from indexer.version import list_versions, read_current
from tests.test_indexer_build import _vectors, make_products
from vitrine.cli import main


def _three_versions(root: Path) -> list[str]:
    for seed in range(3):
        build_index_from_vectors(_vectors(50, seed), make_products(50), root, "a" * 64, root, name=f"v{seed}")
    return list_versions(root)


def test_rollback_goes_to_the_previous_version_then_to_a_named_one(tmp_path: Path) -> None:
    names = _three_versions(tmp_path)
    assert read_current(tmp_path) == names[-1]
    assert rollback(tmp_path) == names[-2]
    assert read_current(tmp_path) == names[-2]
    assert rollback(tmp_path, to=names[-1]) == names[-1]
    assert read_current(tmp_path) == names[-1]


def test_failed_rollback_leaves_current_intact(tmp_path: Path) -> None:
    names = _three_versions(tmp_path)
    with pytest.raises(VersionError, match="no complete version named 'nope'"):
        rollback(tmp_path, to="nope")
    (tmp_path / names[1] / "vectors.f16.npy").write_bytes(b"corrupt")
    with pytest.raises(VersionError):
        rollback(tmp_path)
    assert read_current(tmp_path) == names[-1]
    shutil.rmtree(tmp_path / names[0])
    shutil.rmtree(tmp_path / names[1])
    with pytest.raises(VersionError, match="oldest version"):
        rollback(tmp_path)
    assert read_current(tmp_path) == names[-1]


def test_index_rollback_and_list_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = _three_versions(tmp_path)
    assert main(["index", "rollback", "--index-root", str(tmp_path)]) == 0
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0
    marked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and names[-2] in marked[0]
    assert main(["index", "rollback", "--index-root", str(tmp_path), "--to", "missing"]) == 2
    assert "no complete version named 'missing'" in capsys.readouterr().err


def test_publish_keeps_the_last_n_but_never_current_or_its_predecessor(tmp_path: Path) -> None:
    for seed in range(3):
        build_index_from_vectors(_vectors(50, seed), make_products(50), tmp_path, "a" * 64, tmp_path, name=f"v{seed}",
                                 keep_versions=2)
    assert list_versions(tmp_path) == ["v1", "v2"] and read_current(tmp_path) == "v2"
    rollback(tmp_path, to="v1")  # live is now v1; its predecessor is gone, v2 stays as the newest
    build_index_from_vectors(_vectors(50, 9), make_products(50), tmp_path, "a" * 64, tmp_path, name="v3",
                             keep_versions=1)
    assert read_current(tmp_path) == "v3" and list_versions(tmp_path) == ["v1", "v2", "v3"], \
        "v2 precedes CURRENT, v1 was live until v3: both kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash")]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_versions(tmp_path, 0)


@pytest.mark.parametrize("damage", ["deleted", "empty", "garbage"])
def test_rollback_to_a_named_version_repairs_a_missing_or_broken_current(tmp_path: Path, damage: str) -> None:
    """With --to the target is known, so a CURRENT that is gone or unreadable does not block the recovery."""
    names = _three_versions(tmp_path)
    current = tmp_path / "CURRENT"
    if damage == "deleted":
        current.unlink()
    else:
        current.write_text("" if damage == "empty" else "../elsewhere\n", encoding="utf-8")
    assert rollback(tmp_path, to=names[1]) == names[1]
    assert read_current(tmp_path) == names[1]


def test_rollback_when_the_live_folder_is_gone_names_the_version_to_roll_back_to(tmp_path: Path) -> None:
    """CURRENT naming a deleted folder refused the plain rollback without saying what would work."""
    names = _three_versions(tmp_path)
    shutil.rmtree(tmp_path / names[-1])
    with pytest.raises(VersionError, match=f"rollback --to {names[-2]}"):
        rollback(tmp_path)
    assert read_current(tmp_path) == names[-1]  # untouched: a plain rollback does not guess
    assert rollback(tmp_path, to=names[-2]) == names[-2]


def test_index_list_flags_damaged_versions_and_a_current_that_names_none(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`index list` showed a version with a truncated file or a hand-edited count like a good one (rollback then
    refused it), showed no live version without a word when CURRENT named no folder, and printed nothing at all
    for a folder holding no version."""
    import json

    names = _three_versions(tmp_path)
    vectors = tmp_path / names[1] / "vectors.f16.npy"
    vectors.write_bytes(vectors.read_bytes()[:1000])  # truncated
    manifest_path = tmp_path / names[0] / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "count": 49}))  # edited
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"* {names[2]}") and "DAMAGED" not in lines[2]
    assert "DAMAGED" in lines[1] and "vectors.f16.npy has 1000 bytes" in lines[1]
    assert "DAMAGED" in lines[0] and "shard counts do not add up to 49" in lines[0]
    (tmp_path / "CURRENT").write_text("20990101T000000Z\n")
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert not [line for line in out.splitlines() if line.startswith("*")]
    assert "CURRENT names 20990101T000000Z, which is not a complete version" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["index", "list", "--index-root", str(empty)]) == 0
    assert f"no index versions under {empty}" in capsys.readouterr().err


def test_publish_removes_what_a_killed_writer_left_but_not_a_live_writers_folder(tmp_path: Path) -> None:
    """A build or update killed (SIGKILL, the OOM killer) while writing its version left <root>/.tmp-<name> with a
    whole version's bytes in it, and nothing ever removed it: every such night took that much more disk. Now the
    next publish removes the folders no live writer holds, and an interrupted prune's .trash-* folders."""
    import subprocess
    import sys

    from indexer.version import VersionWriter
    from tests.indexer_fixtures import REPO

    _three_versions(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom indexer.version import VersionWriter\n"
         "w = VersionWriter(sys.argv[1], 'killed')\n(w.tmp / 'vectors.f16.npy').write_bytes(bytes(1 << 20))\n"
         "os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path)], cwd=REPO, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert killed.returncode == -9 and (tmp_path / ".tmp-killed" / "vectors.f16.npy").is_file()
    (tmp_path / ".trash-v0").mkdir()  # a prune killed between its rename and its rmtree
    with VersionWriter(tmp_path, "writing") as live:  # another build writing its version right now
        build_index_from_vectors(_vectors(50, 7), make_products(50), tmp_path, "a" * 64, tmp_path, name="v3",
                                 keep_versions=5)
        assert live.tmp.is_dir(), "a live writer's folder stays"
    assert not (tmp_path / ".tmp-killed").exists() and not (tmp_path / ".trash-v0").exists()
    assert read_current(tmp_path) == "v3" and list_versions(tmp_path) == ["v0", "v1", "v2", "v3"]
    assert not (tmp_path / "v3" / ".tmp-writer.lock").exists()


def test_publish_after_a_rollback_keeps_the_version_rolled_back_to(tmp_path: Path) -> None:
    """v2 was bad, the operator rolled back to v1; the next night published v3 with --keep 2 and pruned v1, the
    good version live until then, keeping the bad v2 (v3's predecessor by name) instead. The version that was live
    when another is published is now kept as well."""
    _three_versions(tmp_path)
    rollback(tmp_path, to="v1")
    build_index_from_vectors(_vectors(50, 9), make_products(50), tmp_path, "a" * 64, tmp_path, name="v3",
                             keep_versions=2)
    assert read_current(tmp_path) == "v3" and "v1" in list_versions(tmp_path)
    assert list_versions(tmp_path) == ["v1", "v2", "v3"]
    build_index_from_vectors(_vectors(50, 10), make_products(50), tmp_path, "a" * 64, tmp_path, name="v4",
                             keep_versions=2)
    assert list_versions(tmp_path) == ["v3", "v4"], "the usual pruning once the rollback is behind"


def test_plain_rollback_after_a_bad_version_and_a_new_publish_returns_to_the_good_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = _three_versions(tmp_path)  # v0, v1 (good), v2 (bad)
    assert rollback(tmp_path) == "v1"  # away from the bad one
    build_index_from_vectors(_vectors(50, 3), make_products(50), tmp_path, "a" * 64, tmp_path, name="v3")
    assert read_current(tmp_path) == "v3"
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0  # `index list` marks where it would go
    marks = {line[2:].split()[0]: line[0] for line in capsys.readouterr().out.splitlines()}
    assert marks == {"v0": " ", "v1": "<", "v2": " ", "v3": "*"}
    assert rollback(tmp_path) == "v1"  # v3 is bad too: back to v1, the last good one, not to v2 (next by name)
    assert rollback(tmp_path) == "v0"  # and further back
    assert names == ["v0", "v1", "v2"]
    history = (tmp_path / "HISTORY").read_text().splitlines()
    assert [line.split()[1:] for line in history] == [
        ["publish", "v0"], ["publish", "v1"], ["publish", "v2"], ["rollback", "v1"], ["publish", "v3"],
        ["rollback", "v1"], ["rollback", "v0"]]


def test_plain_rollback_without_a_usable_history_goes_by_name(tmp_path: Path) -> None:
    _three_versions(tmp_path)
    (tmp_path / "HISTORY").unlink()  # a root published before HISTORY existed
    assert rollback(tmp_path) == "v1"
    (tmp_path / "CURRENT").write_text("v2\n")  # CURRENT edited by hand: the history's top is not the live one
    assert rollback(tmp_path) == "v1"
    shutil.rmtree(tmp_path / "v1")  # a version on the history's stack that is gone is passed over
    (tmp_path / "CURRENT").write_text("v2\n")
    (tmp_path / "HISTORY").write_text("garbage line\n2026-01-01T00:00:00Z publish v0\n"
                                      "2026-01-01T00:00:01Z publish v1\n2026-01-01T00:00:02Z publish v2\n")
    assert rollback(tmp_path) == "v0"


def test_index_list_columns_line_up_when_names_differ_in_length(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A "-1" collision suffix (two builds in one second) shifted that line's columns."""
    for seed, name in enumerate(("20260101T000000Z", "20260101T000000Z-1", "20260102T000000Z")):
        build_index_from_vectors(_vectors(50, seed), make_products(50), tmp_path, "a" * 64, tmp_path, name=name)
    assert main(["index", "list", "--index-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and len({line.index("count=") for line in lines}) == 1
