"""Remote shard mode, the root's side: fan a batch of embedded queries out to shard servers over gRPC.

A root (`vitrine serve --role root --shard-servers h1:p1,h2:p2`) holds the model, the catalog, the
filter columns and the stored vectors of the live version, but no Faiss shard. For each batch of
queries sharing a filter and nprobe it calls `IndexShard.Search` on every shard server at once
(`ShardFanout`), each call with a per-shard deadline: the root's shard timeout, never longer than
what is left of the client's deadline. The per-shard candidates are merged in shard order with the
same `merge_parts` a standalone server uses, so a root over all its shards answers exactly what a
standalone server over the same version answers; then the Searcher re-ranks and groups as always.

Policy for missing shards (also in search.proto):

- a shard server that is down, misses its deadline, fails, or serves another index version than the
  root (the request names the root's version; the shard answers FAILED_PRECONDITION) is *missing*:
  it is logged when its state changes and counted in `vitrine_shard_requests_total{result}`;
- the shards it would have answered for are the version's shards no server answered for; the
  result carries them (`missing_shards`, `partial`);
- no shard answered at all, or any missing under `require_all_shards`: ShardsUnavailable
  (UNAVAILABLE); DeadlineExceeded instead when the client's own deadline has passed;
- several servers answering for one shard (replicas): the first answer in --shard-servers order is used.

Hot swap across processes: a shard server keeps the version it swapped away from and still answers
requests naming it; a root swaps only when no reachable shard server is behind (`ShardFanout.behind`:
each is asked for the new version and none answers FAILED_PRECONDITION; one that is down does not
hold the swap back). Whichever swaps first, the root's requests name a version every live shard
server holds, so a publish costs no partial answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np

from engine import convert
from engine.candidates import EXACT_MAX, Candidates, FilterPlan, ShardSearch, merge_parts
from engine.errors import DeadlineExceeded, ShardsUnavailable
from engine.metrics import Metrics
from engine.types import ShardAnswer, ShardPart, ShardQuery
from indexer.version import IndexVersion
from protos.vitrine.v1 import shard_pb2_grpc

logger = logging.getLogger("vitrine.engine")

_RESULTS = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded", grpc.StatusCode.UNAVAILABLE: "unavailable",
            grpc.StatusCode.FAILED_PRECONDITION: "version_mismatch"}
RECONNECT_BACKOFF_MS = (100, 2000)  # first and longest wait before reconnecting to a shard server that went away


class ShardFanout:
    """Channels to the shard servers; `call` asks all of them at once, each with its own deadline."""

    def __init__(self, targets: Sequence[str], metrics: Metrics, timeout_s: float,
                 max_message_bytes: int = 16 << 20, credentials: grpc.ChannelCredentials | None = None) -> None:
        if not targets:
            raise ValueError("a root needs at least one shard server (host:port)")
        self.targets = list(targets)
        self.metrics = metrics
        self.timeout_s = timeout_s  # per-shard deadline, capped by the client's remaining time
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
                   ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
                   ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1])]
        self._channels = [grpc.insecure_channel(target, options=options) if credentials is None
                          else grpc.secure_channel(target, credentials, options=options) for target in self.targets]
        self._stubs = [shard_pb2_grpc.IndexShardStub(channel) for channel in self._channels]
        self._states: dict[str, str] = {}  # last result per shard server: state changes are logged
        self._lock = threading.Lock()

    def call_timeout(self, deadline: float | None) -> float:
        """Seconds each shard call may take: the shard timeout, at most the client's remaining time."""
        if deadline is None:
            return self.timeout_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the shard servers were asked; give the call more time")
        return min(self.timeout_s, remaining)

    def call(self, query: ShardQuery, deadline: float | None) -> list[ShardAnswer | None]:
        """Every shard server's answer, in --shard-servers order; None for one that failed (logged, counted)."""
        timeout = self.call_timeout(deadline)
        message = convert.shard_query_to_proto(query)
        began = time.perf_counter()
        finished = [began] * len(self._stubs)

        def on_done(index: int) -> object:
            def record(_: object) -> None:
                finished[index] = time.perf_counter()
            return record

        futures = []
        for index, stub in enumerate(self._stubs):
            future = stub.Search.future(message, timeout=timeout)
            future.add_done_callback(on_done(index))
            futures.append(future)
        answers = []
        for index, (target, future) in enumerate(zip(self.targets, futures, strict=True)):
            result, answer, detail = self._collect(future, query.index_version)
            self.metrics.observe_shard_call(target, result, max(0.0, finished[index] - began))
            self._note(target, result, detail)
            answers.append(answer)
        return answers

    @staticmethod
    def _collect(future: grpc.Future, version: str) -> tuple[str, ShardAnswer | None, str]:
        """(result label, the answer or None, what went wrong) of one shard call."""
        try:
            answer = convert.shard_answer_from_proto(future.result())
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            return _RESULTS.get(code, "error"), None, f"{code.name}: {err.details()}"  # type: ignore[attr-defined]
        except ValueError as exc:  # a malformed answer
            return "error", None, str(exc)
        if version and answer.index_version != version:
            return "version_mismatch", None, f"it serves index version {answer.index_version}, the root {version}"
        return "ok", answer, ""

    def _note(self, target: str, result: str, detail: str) -> None:
        """Log a shard server's change of state (answering <-> missing), not every call."""
        with self._lock:
            previous, self._states[target] = self._states.get(target), result
        if result == previous:
            return
        if result == "ok":
            if previous is not None:
                logger.info("shard server %s answers again", target)
        else:
            logger.warning("shard server %s is missing from answers (%s): %s", target, result, detail)

    def behind(self, version: str, dim: int) -> list[str]:
        """The shard servers that answer but do not serve `version` (yet): empty when a root may swap to it.

        Every server is asked one query naming `version`; a server that is down or slow (no answer
        within the shard timeout) is not counted, it would be missing from either version's answers.
        Not counted in the shard call metrics (it is not a search).
        """
        query = ShardQuery(vectors=np.full((1, dim), dim ** -0.5, np.float32), k=1, nprobe=None,
                           index_version=version)
        message = convert.shard_query_to_proto(query)
        futures = [stub.Search.future(message, timeout=self.timeout_s) for stub in self._stubs]
        late = []
        for target, future in zip(self.targets, futures, strict=True):
            try:
                answer = future.result()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                    late.append(target)
                continue
            if answer.index_version != version:
                late.append(target)
        return late

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            channel.close()


class RemoteShardSearch(ShardSearch):
    """The candidates of a root: filter plans here, Faiss shards on the shard servers (see the module docstring).

    `version` is the root's version, opened without Faiss shards. Filters passing at most
    `exact_max` products are still scored exactly here from the stored vectors (no shard is asked).
    """

    def __init__(self, version: IndexVersion, fanout: ShardFanout, exact_max: int = EXACT_MAX,
                 require_all: bool = False, batch_threads: int = 0) -> None:
        super().__init__(version, exact_max, batch_threads=batch_threads)
        self.fanout = fanout
        self.require_all = require_all

    def fan_out(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan,
                deadline: float | None) -> Candidates:
        """Ask every shard server, merge what came back in shard order, name the shards missing."""
        nq = xq.shape[0]
        query = ShardQuery(vectors=np.ascontiguousarray(xq, dtype=np.float32), k=k, nprobe=nprobe,
                           filter=plan.filter, index_version=self.version.name)
        parts: dict[int, ShardPart] = {}
        answered: set[int] = set()
        for answer in self.fanout.call(query, deadline):
            if answer is None:
                continue
            for part in answer.parts:
                if part.ids.shape[0] != nq or part.scores.shape != part.ids.shape:
                    raise RuntimeError(f"shard {part.shard} answered {part.ids.shape} candidates for {nq} queries")
                parts.setdefault(part.shard, part)
            answered.update(answer.shards)
        missing = tuple(s for s in range(self.version.shard_count) if s not in answered)
        if missing:
            self._refuse_when_required(missing, answered, deadline)
        return Candidates(*merge_parts([parts[s] for s in sorted(parts) if s in answered], nq, k),
                          missing_shards=missing)

    def _refuse_when_required(self, missing: tuple[int, ...], answered: set[int], deadline: float | None) -> None:
        """DeadlineExceeded / ShardsUnavailable when missing shards may not give a partial answer."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed while the shard servers searched; give the call more time")
        names = ", ".join(map(str, missing))
        if not answered:
            raise ShardsUnavailable(f"no shard server answered (shards {names} of index version {self.version.name} "
                                    f"missing; servers {', '.join(self.fanout.targets)}); retry with backoff")
        if self.require_all:
            raise ShardsUnavailable(f"shards {names} of index version {self.version.name} did not answer and this "
                                    "root requires every shard; retry with backoff")
