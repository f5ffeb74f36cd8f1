"""One plan across many processes: each process runs a deterministic share of it (`run --shard K/N`).

Every process builds the same plan (same recipe, options and data) and keeps the batches it owns.
Ownership is decided on the plan's canonical batches: every result of the plan that can run,
batched as a single process would batch them (flowgen.plan.batching), whatever is done already.
The batches are ranked by a hash of their content (their results' ids) and batch number r of that
order belongs to shard r mod N.
- Canonical batches, not single results: a shard renders the very engine calls a single process
  would (same rows, same batch sizes), so its images are byte-identical to a one-process run (rows
  can differ with the batch size on XLA:CPU).
- The whole plan, not what is left to do: the owner of a result never moves with the manifest, so a
  killed shard that is run again renders only its own missing results, and no result falls between
  shards. Ranking by content hash keeps shares within one batch of each other and independent of
  list positions (reordered data rows give the same shares).
A batch of which only some results are left to do (an output deleted since) is batched again from
what is left of it. Results that cannot run (an item error) belong to the shard their item id
hashes to.

A shard holds the folder's run lock shared (a plain run, `prune`, `gc` and `redeliver` take it
whole, so they and shards exclude each other) and its own lock, .flowgen/shards/K-of-N.lock, whole
(with the heartbeat `status` reads). It records into its own manifest, .flowgen/shards/K-of-N.sqlite
(ShardManifest), which diffs against the main manifest and every shard together and which
flowgen.run.merge folds into the main manifest. `--distributed` and the Ray runner use this same
mechanism (flowgen.run.distributed, flowgen.run.ray_runner): a `--distributed` process is a shard
whose share is every batch, rendered in lockstep with the others on one device mesh, of which it
records the rows its devices computed (`lockstep`, `agree`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from flowgen.errors import FlowgenError
from flowgen.plan.batching import make_batches
from flowgen.plan.diff import PlanDiff
from flowgen.plan.model import Batch, Plan, PlannedResult
from flowgen.plan.run_plan import RunPlan
from flowgen.run.lock import FolderBusy, Holder, RunLock, acquire, lock_path, lock_state, read_holder
from flowgen.run.manifest import STATE_DIR, Manifest

SHARDS_DIR = "shards"
DEFAULT_CANARY_WAIT = 1800.0  # seconds a shard waits for the shard checking the canary (run --canary-wait)
SHARD_ENV = "FLOWGEN_SHARD"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count); canary_wait: how long it waits for the shard
    that checks the canary (flowgen.run.shard_canary)."""

    index: int
    count: int
    canary_wait: float = field(default=DEFAULT_CANARY_WAIT, compare=False)

    @classmethod
    def parse(cls, text: str, source: str = "--shard") -> Shard:
        """'K/N' as the user wrote it; a FlowgenError (one line naming `source`) otherwise."""
        match = _SPEC.match(text or "")
        if not match:
            raise FlowgenError(
                f"{source} {text!r}: expected K/N, this process's shard K of N shards (0 <= K < N), e.g. 0/4"
            )
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise FlowgenError(f"{source} {text}: N, the number of shards, must be at least 1")
        if index >= count:
            raise FlowgenError(f"{source} {text}: K must be below N (shards are numbered 0 to {count - 1})")
        return cls(index, count)

    @classmethod
    def from_option(cls, option: str | None) -> Shard | None:
        """--shard, else $FLOWGEN_SHARD, else None (not sharded)."""
        if option is not None:
            return cls.parse(option)
        env = os.environ.get(SHARD_ENV)
        return cls.parse(env, f"${SHARD_ENV}") if env not in (None, "") else None

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def db_path(self, out_dir: str | Path) -> Path:
        return shards_dir(out_dir) / f"{self.name}.sqlite"

    def lock_path(self, out_dir: str | Path) -> Path:
        return shards_dir(out_dir) / f"{self.name}.lock"

    # --- the share ------------------------------------------------------------------------
    lockstep = False  # renders its own batches alone (`--distributed`'s processes render every batch together)

    def agree(self, batches) -> None:
        """Nothing to agree on: no other process renders these batches (see distributed.ProcessShare)."""

    def decide(self, name: str, reason: str | None) -> str | None:
        """Whether the run halts here (`reason`: "interrupted", "budget", "fail_fast"), decided alone."""
        return reason

    def select(self, run_plan: RunPlan) -> ShareRunPlan:
        """`run_plan` cut to this shard's share: its results, and its canonical batches that are
        still wholly to do, as they are (see the module doc)."""
        plan = run_plan.plan
        owner = owners(plan, self.count)
        runnable = tuple(r for r in run_plan.runnable if owner[r.rid] == self.index)
        blocked = tuple(r for r in run_plan.blocked if _item_owner(r.item.item_id, self.count) == self.index)
        todo = {r.rid for r in runnable}
        whole: list[Batch] = []
        rest: list[PlannedResult] = []
        for batch in canonical_batches(plan):
            left = [r for r in batch.results if r.rid in todo]
            if len(left) == len(batch.results):
                whole.append(batch)
            else:
                rest += left
        diff = run_plan.diff
        share_diff = PlanDiff(
            order=tuple(r for r in diff.order if _owns(self, owner, r)),
            new=tuple(r for r in diff.new if _owns(self, owner, r)),
            unchanged=tuple(r for r in diff.unchanged if _owns(self, owner, r)),
            changed=tuple((r, why) for r, why in diff.changed if _owns(self, owner, r)),
            removed=diff.removed if self.index == 0 else (),
        )  # said once, by shard 0
        return ShareRunPlan(
            plan,
            share_diff,
            runnable,
            blocked,
            verified=run_plan.verified,
            index=run_plan.index,
            shard=self,
            share_batches=tuple(whole) + tuple(make_batches(rest, plan.max_batch, plan.batch_multiple)),
        )

    # --- the folder -----------------------------------------------------------------------
    @contextmanager
    def lock(self, out_dir: str | Path, run_id: str) -> Iterator[RunLock]:
        """Hold the folder's run lock shared and this shard's lock whole (FolderBusy otherwise)."""
        main = lock_path(out_dir)
        main.parent.mkdir(parents=True, exist_ok=True)
        shards_dir(out_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(main, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not acquire(fd, fcntl.LOCK_SH, out_dir, main):
                holder = read_holder(main)
                who = holder.describe() if holder else "another run"
                raise FolderBusy(
                    f"{out_dir}: {who} is using this output folder (not as a shard); "
                    "wait for it to finish or stop it (Ctrl-C), then run the shard again"
                )
            with RunLock(out_dir, run_id, path=self.lock_path(out_dir)) as lock:
                yield lock
        finally:
            os.close(fd)  # releases the shared lock

    def manifest(self, out_dir: str | Path) -> ShardManifest:
        return ShardManifest(out_dir, self)

    def check_canary(self, manifest: Manifest, plan: Plan, engine, run_id: str, note: Callable[[str], None]):
        """The canary's (verdicts, failure lines): checked once for every shard of the plan, by the
        first to get there; the others wait for its verdict (flowgen.run.shard_canary)."""
        from flowgen.run.shard_canary import shared_canary

        return shared_canary(manifest, plan, engine, run_id, str(self), self.canary_wait, note)


@dataclass(frozen=True)
class ShareRunPlan(RunPlan):
    """A RunPlan cut to one shard's share; its batches are the shard's canonical batches (under a
    --limit, what the limit keeps is batched again, as a plain run does)."""

    shard: Shard | None = None
    share_batches: tuple[Batch, ...] = ()

    @cached_property
    def _batches(self) -> tuple[Batch, ...]:
        if self.limit is None:
            return self.share_batches
        return tuple(make_batches(self.runnable, self.plan.max_batch, self.plan.batch_multiple))


def _owns(shard: Shard, owner: dict[tuple[str, int], int], result: PlannedResult) -> bool:
    rid = result.rid
    return owner[rid] == shard.index if rid in owner else _item_owner(rid[0], shard.count) == shard.index


def canonical_batches(plan: Plan) -> list[Batch]:
    """The batches a single process would run on an empty folder: every result that can run."""
    return make_batches([r for r in plan.results if not r.item.error], plan.max_batch, plan.batch_multiple)


def owners(plan: Plan, count: int) -> dict[tuple[str, int], int]:
    """Result id -> the shard that renders it, for every result that can run (see the module doc)."""
    ranked = sorted(canonical_batches(plan), key=_batch_key)
    return {r.rid: rank % count for rank, batch in enumerate(ranked) for r in batch.results}


def _batch_key(batch: Batch) -> str:
    ids = "\n".join(f"{item_id}#{index}" for item_id, index in sorted(r.rid for r in batch.results))
    return hashlib.sha256(ids.encode()).hexdigest()


def _item_owner(item_id: str, count: int) -> int:
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:15], 16) % count


# --- the shards of a folder ----------------------------------------------------------------


def shards_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR / SHARDS_DIR


def shard_files(out_dir: str | Path) -> list[Path]:
    """The shard manifests of `out_dir`, oldest first (by modification time)."""
    folder = shards_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.sqlite"), key=lambda p: (_mtime(p), p.name))


def shard_states(out_dir: str | Path, now: float | None = None) -> list[tuple[str, str, Holder | None]]:
    """(shard name, "running" | "stale", holder) of every shard whose lock a process holds now."""
    folder = shards_dir(out_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*-of-*.lock")):  # not canary.lock (flowgen.run.shard_canary)
        state, holder = lock_state(path, now)
        if state != "idle":
            found.append((path.stem, state, holder))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --- a shard's manifest ----------------------------------------------------------------------

COMPLETE_KEY = "shard_complete"  # meta key prefix: a shard completed its share of one plan


class ShardManifest(Manifest):
    """A shard's own manifest: written by its run alone, read together with the main manifest and the
    other shards (what is done anywhere is done), folded into the main one when the run ends."""

    def __init__(self, out_dir: str | Path, shard: Shard):
        super().__init__(out_dir, path=shard.db_path(out_dir))
        self.shard = shard

    def index(self):
        from flowgen.run.merge import MergedView

        with MergedView(self.out_dir) as view:
            return view.index()

    def get(self, item_id: str, result_index: int):
        from flowgen.run.merge import MergedView

        with MergedView(self.out_dir) as view:
            return view.get(item_id, result_index)

    def canary_items(self) -> list[str]:
        """The canary's fixed items as the folder knows them (the main manifest's, else a shard's)."""
        from flowgen.run.merge import MergedView

        with MergedView(self.out_dir) as view:
            return view.canary_items()

    def record_watermarks(self, watermarks, run_id: str) -> None:
        """This shard completed its share: the watermarks move when every shard of the plan has (flowgen.run.merge)."""
        row = self.conn.execute("SELECT plan_hash FROM runs WHERE run_id=?", (run_id,)).fetchone()
        key = f"{COMPLETE_KEY}:{row[0] if row else ''}:{self.shard.name}"
        self.set_meta(key, json.dumps({"watermarks": watermarks, "run_id": run_id}, sort_keys=True))

    def export_jsonl(self) -> Path:
        """Fold the shards into the main manifest (this one as far as it got) and export that."""
        from flowgen.run.merge import fold_shards

        fold_shards(self.out_dir)
        with Manifest(self.out_dir) as main:
            return main.export_jsonl()


class _WholeFolder:
    """The share of a plain run: the whole plan, the folder's lock, the main manifest."""

    lockstep = False

    def agree(self, batches) -> None:
        """A plain run renders alone."""

    def decide(self, name: str, reason: str | None) -> str | None:
        return reason

    def select(self, run_plan: RunPlan) -> RunPlan:
        return run_plan

    def lock(self, out_dir: str | Path, run_id: str) -> RunLock:
        return RunLock(out_dir, run_id)

    def manifest(self, out_dir: str | Path) -> Manifest:
        return Manifest(out_dir)

    def check_canary(self, manifest: Manifest, plan: Plan, engine, run_id: str, note: Callable[[str], None]):
        """The canary's (verdicts, failure lines), checked here (flowgen.run.canary)."""
        from flowgen.run.canary import check_canary

        assert plan.canary is not None
        return check_canary(manifest, plan, engine, plan.canary, run_id)


whole_folder = _WholeFolder()
Share = Shard | _WholeFolder  # what execute() runs: a shard's share, or the whole folder


__all__ = [
    "SHARD_ENV",
    "Share",
    "Shard",
    "ShardManifest",
    "ShareRunPlan",
    "canonical_batches",
    "owners",
    "shard_files",
    "shard_states",
    "shards_dir",
    "whole_folder",
]
