"""model.runtime.tune_malloc: glibc's thresholds raised once, the user's opt-outs respected, and freed
buffers really reused (page faults counted, in fresh interpreters so that no test inherits another's setting)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 64 MiB buffer 12 times (above glibc's largest dynamic mmap threshold, 32 MiB, so
# by default every round maps fresh pages); report the minor page faults of the last 10 rounds.
PROBE = """
import json, resource, sys
import numpy as np
from model.runtime import tune_malloc
applied = tune_malloc()
assert tune_malloc() is applied  # once per process
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.ones(64 << 17)  # 64 MiB of float64, every page written
    del buf
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[2:])}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")


def run_probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("VITRINE_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                                                              "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_malloc_reuses_freed_buffers_instead_of_faulting_them_in_again() -> None:
    tuned = run_probe()
    default = run_probe(VITRINE_MALLOC="0")
    assert tuned["applied"] == {"mmap_threshold": 128 << 20, "trim_threshold": 1 << 30}
    assert default["applied"] == {}
    # glibc's default: every round maps the buffer afresh and the kernel zero-fills it again (at least one fault
    # per 2 MiB, the largest page numpy's buffers get with transparent huge pages; 4 KiB pages fault far more)
    assert default["faults"] >= 10 * (64 // 2)
    assert tuned["faults"] < default["faults"] / 10  # tuned: the rounds after the first reuse the same memory


@glibc_only
def test_glibc_environment_variables_win() -> None:
    assert run_probe(MALLOC_TRIM_THRESHOLD_="1000000")["applied"] == {}
    assert run_probe(VITRINE_MALLOC="off")["applied"] == {}
