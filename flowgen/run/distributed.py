"""Multi-controller JAX (`flowgen run RECIPE --distributed`): every host runs the same command.

Each process joins the job with jax.distributed.initialize — from FLOWGEN_COORDINATOR (HOST:PORT
of process 0), FLOWGEN_NUM_PROCESSES and FLOWGEN_PROCESS_ID, or JAX's own cluster detection (TPU
slices, SLURM, Open MPI) for what they leave unset. The engine then lays ONE device mesh over every
process's devices, the batch's rows on "data" (flowgen.engine.runtime.placement), so every engine
call is a call of every process: the processes run in lockstep. Each process:
- builds the same plan and, against the same manifest view (the main manifest and every shard), the
  same batches to render; the processes publish a digest of that list through the coordination
  service's key-value store and compare (`ProcessShare.agree`): nobody records anything between
  the diff and that barrier, so a rerun agrees on what is missing;
- renders every batch (and the canary) with the others, and stores and records only the rows its
  own devices computed (`PipelineEngine.own_rows`), in its own manifest shard
  (.flowgen/shards/K-of-N.sqlite, flowgen.run.shards, K = process id, N = process count) under its
  own lock, as `--shard K/N` does. Process 0 folds the shards into the main manifest once every
  process is done;
- decides with the others, before each batch, whether to go on (`ProcessShare.decide`): one that
  would stop (Ctrl-C, SIGTERM, its --budget, --fail-fast, a dead peer) stops them all there, so no
  process is left waiting in an engine call for one that left. The canary is computed by all of
  them together, not once by the first shard as `--shard` does.

A dead peer ends the run on every survivor with one line, not a core dump:
- the next engine call gathers the batch's images from every process and fails within a second
  (MeshPeerLost: gloo "Connection closed by peer"); the run ends there, what was recorded is kept
  (the batch in progress is not recorded), the process says so and exits 1;
- jax_enable_recoverability keeps a process alive when a peer dies; a watcher thread reads the
  coordination service's live processes every second and stops the run after its current batch
  when one is gone (a peer silent for --heartbeat-timeout), and ends the waits at the barriers.
- When process 0 dies, the coordination service dies with it and XLA aborts every other process at
  once (SIGABRT, whatever the flags). So the command runs the JAX work in a child process and
  supervises it: XLA's log lines go to a file, and a child killed by a signal becomes one line.
A peer that never starts stops the others at --init-timeout; a peer that stops sending heartbeats
is dead after --heartbeat-timeout. Run every process again to complete the plan.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from flowgen.engine import MeshPeerLost
from flowgen.errors import FlowgenError
from flowgen.run.crash import one_line
from flowgen.run.interrupt import StopRequest
from flowgen.run.shards import Shard

COORDINATOR_ENV = "FLOWGEN_COORDINATOR"
NUM_PROCESSES_ENV = "FLOWGEN_NUM_PROCESSES"
PROCESS_ID_ENV = "FLOWGEN_PROCESS_ID"
_CHILD_ENV = "_FLOWGEN_DISTRIBUTED_CHILD"  # set by the supervising parent for the process that runs JAX
_ANNOUNCE = re.compile(r"^distributed: process (\d+) of (\d+)")
_FINISHED_TEXT = "distributed: finished, exit code "  # the child's last line before it disconnects (not shown)
_FINISHED = re.compile(r"^distributed: finished, exit code (\d+)$")
# XLA / absl log lines ("F1207 18:03:13.591021    7130 client.h:80] ...") and what follows a fatal one
_NATIVE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
# what flowgen itself writes to stderr; after a native log line, any other line continues it (gRPC's
# "Additional GRPC error information ..." lines)
_OWN = re.compile(r"^(error:|warning:|distributed:|stopping|rendering|removed|interrupted|\[\d+/\d+\])")
POLL_SECONDS = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 60
DEFAULT_INIT_TIMEOUT = 300


@dataclass(frozen=True)
class DistributedSettings:
    """--heartbeat-timeout and --init-timeout, in seconds."""

    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    init_timeout: int = DEFAULT_INIT_TIMEOUT


class PeerGone(FlowgenError):
    """A barrier cannot pass: a peer process died (the message says which, or that process 0 is gone)."""


@dataclass(frozen=True)
class ProcessShare(Shard):
    """Process `index` of `count` of the job: renders every batch in lockstep with the others and
    records the rows its devices computed in its own manifest shard (see module doc).
    exchange(name, value): publishes this process's `value` under `name` and returns every process's."""

    exchange: Callable[[str, str], list[str]] | None = field(default=None, compare=False, kw_only=True)
    lockstep = True

    def select(self, run_plan):
        """Every batch (the others render them too); the results that cannot run, recorded by one process."""
        from dataclasses import replace

        from flowgen.run.shards import _item_owner

        return replace(
            run_plan,
            blocked=tuple(r for r in run_plan.blocked if _item_owner(r.item.item_id, self.count) == self.index),
        )

    def check_canary(self, manifest, plan, engine, run_id: str, note: Callable[[str], None]):
        """The canary, checked by every process together (each of its engine calls is every process's),
        not once by the first shard while the others wait, as `--shard` does (flowgen.run.shard_canary)."""
        from flowgen.run.shards import whole_folder

        return whole_folder.check_canary(manifest, plan, engine, run_id, note)

    def agree(self, batches: Sequence) -> None:
        """Wait until every process has diffed the plan against the folder, then check that they all
        render the same batches (a FlowgenError otherwise: the folder changed under them)."""
        assert self.exchange is not None
        digest = hashlib.sha256(
            "\n".join(
                f"{batch.size}:" + ",".join(f"{i}#{n}" for i, n in (r.rid for r in batch.results)) for batch in batches
            ).encode()
        ).hexdigest()
        theirs = self.exchange("todo", digest)
        differing = [k for k, value in enumerate(theirs) if value != digest]
        if differing:
            raise FlowgenError(
                f"distributed run: process {', '.join(map(str, differing))} found other work left to do than process "
                f"{self.index} ({len(batches)} batch(es)); was the output folder or the recipe changed while the "
                "processes started? Run every process again"
            )

    def decide(self, name: str, reason: str | None) -> str | None:
        """Whether the run halts at this point, decided by every process together: a process that would
        stop (Ctrl-C or SIGTERM, its --budget, a failure under --fail-fast, a dead peer) stops them all
        here, so no process waits in an engine call for one that left (the most urgent reason wins)."""
        assert self.exchange is not None
        said = set(self.exchange(f"halt/{name}", reason or ""))
        return next((r for r in HALT_REASONS if r in said), None)


HALT_REASONS = ("interrupted", "budget", "fail_fast")  # most urgent first

RunShare = Callable[[Shard, StopRequest], "tuple[int, Path]"]  # runs a share; returns (exit code, output folder)


def run_distributed(settings: DistributedSettings, run_share: RunShare) -> int:
    """This process's part of the job: as the supervising parent, the exit code of the child that
    runs it; as that child, join the job, run the share, wait for the others (see the module doc)."""
    if os.environ.get(_CHILD_ENV) != "1":
        return _supervise()
    joined, client = _join(settings)
    click.echo(f"distributed: process {joined.index} of {joined.count}", err=True)  # the parent names it so
    stop = StopRequest(
        on_first=lambda: click.echo("stopping after the current batch (Ctrl-C again to abort)", err=True)
    )
    watch = _PeerWatch(client, joined, stop)

    def exchange(name: str, value: str) -> list[str]:
        client.key_value_set(f"flowgen/{name}/{joined.index}", value)
        keys = [f"flowgen/{name}/{k}" for k in range(joined.count)]
        _wait(watch, lambda: all(_has_key(client, key) for key in keys))
        if watch.dead is not None:
            raise PeerGone(watch.dead)
        return [client.key_value_try_get(key) for key in keys]

    shard = ProcessShare(joined.index, joined.count, exchange=exchange)
    watch.start()
    try:
        code, out_dir = run_share(shard, stop)
        if watch.dead is None:
            client.key_value_set(f"flowgen/done/{shard.index}", str(code))
            _wait(watch, lambda: all(_has_key(client, f"flowgen/done/{k}") for k in range(shard.count)))
    except (PeerGone, MeshPeerLost) as err:  # the run's end is recorded; one line, not the shutdown barrier's wait
        watch.close()
        _dead_peer_exit(shard, str(err), current_recorded=False)
    except BaseException:
        watch.close()
        raise
    if watch.dead is not None:
        _dead_peer_exit(shard, watch.dead)
    if shard.index == 0:
        from flowgen.run.merge import fold_shards

        fold_shards(out_dir)
        client.key_value_set("flowgen/merged", "1")
    else:
        _wait(watch, lambda: _has_key(client, "flowgen/merged"))
    everyone_left = False  # everyone saw the merge before anyone shuts down (process 0's service with it)
    if watch.dead is None:
        client.key_value_set(f"flowgen/leaving/{shard.index}", "1")
        everyone_left = _wait(watch, lambda: all(_has_key(client, f"flowgen/leaving/{k}") for k in range(shard.count)))
    watch.close()
    if not everyone_left:  # (a peer that passed the barrier and disconnected first is not dead: it finished)
        _dead_peer_exit(shard, watch.dead or "a peer process stopped")
    import jax

    # the work is done and recorded: a failure from here on (the service going away while this process
    # disconnects, seen under load) must not turn the run into a failure; the parent is told so
    click.echo(f"{_FINISHED_TEXT}{code}", err=True)
    jax.distributed.shutdown()  # every process is here: the shutdown barrier passes at once
    return code


def _join(settings: DistributedSettings):
    """jax.distributed.initialize from the FLOWGEN_ variables (or JAX's detection); (Shard, client)."""
    coordinator = os.environ.get(COORDINATOR_ENV) or None
    count = _int_env(NUM_PROCESSES_ENV, minimum=1)
    index = _int_env(PROCESS_ID_ENV, minimum=0)
    if count is not None and index is not None and index >= count:
        raise FlowgenError(
            f"${PROCESS_ID_ENV}={index}: must be below ${NUM_PROCESSES_ENV}={count} "
            f"(processes are numbered 0 to {count - 1})"
        )
    import jax
    from jax._src.distributed import global_state  # the coordination client: live processes, key-value store

    jax.config.update("jax_enable_recoverability", True)  # a dead peer must not abort the survivors
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=count,
            process_id=index,
            initialization_timeout=settings.init_timeout,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
        )
    except Exception as err:  # no coordinator given and none detected, or it could not be reached in time
        raise FlowgenError(
            f"--distributed: cannot join the JAX job ({one_line(err)}); set {COORDINATOR_ENV}=HOST:PORT "
            f"(process 0's address), {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or run under a "
            "launcher JAX detects (TPU slice, SLURM, Open MPI)"
        ) from None
    return Shard(jax.process_index(), jax.process_count()), global_state.client


def _int_env(name: str, minimum: int) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < minimum:
        raise FlowgenError(f"${name}={text!r}: expected a whole number >= {minimum}")
    return int(text)


class _PeerWatch(threading.Thread):
    """Reads the live processes every POLL_SECONDS; a missing one is dead: stop the run, remember who."""

    def __init__(self, client, shard: Shard, stop: StopRequest):
        super().__init__(name="flowgen-peers", daemon=True)
        self.client, self.shard, self.stop = client, shard, stop
        self.dead: str | None = None
        self._closed = threading.Event()

    def run(self) -> None:
        everyone = list(range(self.shard.count))
        while not self._closed.wait(POLL_SECONDS):
            try:
                live = set(self.client.get_live_nodes(everyone))
            except Exception as err:
                self.dead = f"the JAX coordination service cannot be reached ({one_line(err)})"
            else:
                gone = [k for k in everyone if k not in live]
                if gone:
                    self.dead = "process " + ", ".join(map(str, gone)) + " stopped sending heartbeats (died?)"
            if self.dead is not None:
                self.stop.request()
                return

    def close(self) -> None:
        self._closed.set()


def _has_key(client, key: str) -> bool:
    """Whether the coordination service's key-value store holds `key` (its try_get raises NOT_FOUND)."""
    try:
        return client.key_value_try_get(key) is not None
    except Exception as err:
        if "NOT_FOUND" in str(err):
            return False
        raise


def _wait(watch: _PeerWatch, done: Callable[[], bool]) -> bool:
    """Until `done()` holds (True) or a peer died (False); no time limit while every peer lives: one
    may have more to render. `done()` is asked first: a peer that passed this barrier and left is
    not dead to the ones still here."""
    while True:
        try:
            if done():
                return True
        except Exception as err:  # the coordination service is gone: process 0 died
            watch.dead = watch.dead or f"the JAX coordination service cannot be reached ({one_line(err)})"
            return False
        if watch.dead is not None:
            return False
        time.sleep(POLL_SECONDS / 4)


def _dead_peer_exit(shard: Shard, why: str, current_recorded: bool = True) -> None:
    """One line, then exit 1 at once: jax.distributed.shutdown would wait for the dead peer."""
    stopped = (
        "this process stopped after its current batch and everything it rendered is recorded"
        if current_recorded
        else "this process stopped; the batches it completed are recorded, the one in progress is not"
    )
    click.echo(
        f"error: distributed run, process {shard.index} of {shard.count}: {why}; {stopped}; "
        "run every process again to complete the plan",
        err=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# --- the supervising parent ------------------------------------------------------------------


def _supervise() -> int:
    """Run this same command in a child that does the JAX work; pass its output through (XLA's own
    log lines to a file) and turn its death by a signal into one line."""
    args = [sys.executable, "-m", "flowgen.cli", *sys.argv[1:]]
    child = subprocess.Popen(
        args,
        env={**os.environ, _CHILD_ENV: "1"},
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_child_setup,
    )
    forwarded = {sig: signal.signal(sig, lambda signum, _: child.send_signal(signum)) for sig in (signal.SIGTERM,)}
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child (same process group)
    native: deque[str] = deque(maxlen=400)
    who = "this process"
    dying = False
    continuing = False  # the last line was XLA's: a line that is not flowgen's continues it
    finished: int | None = None  # the exit code the child's run ended with, once it said so
    said_error = False  # the child wrote an `error:` line of its own
    try:
        assert child.stderr is not None
        for line in child.stderr:
            announced = _ANNOUNCE.match(line)
            if announced:
                who = f"process {announced[1]} of {announced[2]}"
            done = _FINISHED.match(line.rstrip("\n"))
            if done:
                finished = int(done[1])
                continue
            said = line.startswith("error:")  # the child's own one line: shown even amid XLA's dying words
            said_error = said_error or said
            continuing = not said and bool(dying or _NATIVE.match(line) or (continuing and not _OWN.match(line)))
            if continuing:
                native.append(line)
                dying = dying or line.startswith("F")  # a fatal line: what follows is its stack trace
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, previous_int)
    fatal = next((line for line in native if line.startswith("F")), None)
    if finished is not None and (code < 0 or fatal):  # it died disconnecting after its run ended and was recorded
        return finished
    if code >= 0 and (said_error or fatal is None):  # it ended by itself, or said why (e.g. XLA's abort raced
        return code  # its own exit after a dead peer)
    reason = fatal.split("]", 1)[1].strip().split(". ")[0] if fatal else f"killed by {signal.Signals(-code).name}"
    log = _keep(native)
    click.echo(
        f"error: distributed run, {who} stopped: {reason} (a peer process, or process 0 with the coordination "
        f"service, died or cannot be reached); what it rendered is recorded; run every process again to complete"
        f" the plan{f' (XLA log: {log})' if log else ''}",
        err=True,
    )
    return 1


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # XLA's abort: no core file
    try:  # the child dies with its parent (a launcher killing the parent must not leave the JAX process)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _keep(lines: deque[str]) -> str | None:
    if not lines:
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="flowgen-distributed-", suffix=".log")
        with os.fdopen(fd, "w") as handle:
            handle.writelines(lines)
        return path
    except OSError:
        return None
