"""The committed generated protobuf code must match what scripts/gen_protos.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO_ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_protos", module)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current() -> None:
    problems = _gen_protos().stale_files(REPO_ROOT)
    assert not problems, (
        "the generated protobuf code is stale; run `.venv/bin/python scripts/gen_protos.py` and commit the result:\n  "
        + "\n  ".join(problems))


def test_check_mode_exit_code(capsys) -> None:
    assert _gen_protos().main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_generated_modules_import() -> None:
    from protos.vitrine.v1 import search_pb2, search_pb2_grpc

    service = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"]
    assert service.full_name == "vitrine.v1.VisualSearch"
    assert {m.name for m in service.methods} == {"Search", "BatchSearch", "Embed", "GetIndexInfo", "GetProduct"}
    assert hasattr(search_pb2_grpc, "VisualSearchStub")
    assert search_pb2.SearchRequest.DESCRIPTOR.oneofs_by_name["query"].fields
