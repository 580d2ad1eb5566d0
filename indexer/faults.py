"""Fault injection for the crash-and-resume tests of the build job.

Setting ``VITRINE_FAULT=<stage>:<n>[:kill]`` makes the job fail right after it has durably written
its n-th unit of work in that stage during this run (an embedding chunk, an index shard): with
``kill`` the process sends itself SIGKILL (no cleanup runs, like an OOM kill or a lost node),
otherwise it raises InjectedFault. Unset (always, in production) it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "VITRINE_FAULT"


class InjectedFault(RuntimeError):
    """Raised by maybe_fail when VITRINE_FAULT asks for it."""


def maybe_fail(stage: str, done: int) -> None:
    """Fail as VITRINE_FAULT says when `done` units of `stage` were written in this run."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != stage or not parts[1].isdigit() or done < int(parts[1]):
        return
    if len(parts) > 2 and parts[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault after {done} unit(s) of stage {stage} ({ENV}={spec})")
