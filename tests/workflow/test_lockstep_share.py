"""A `--distributed` process's share on the FakeEngine (flowgen.run.distributed.ProcessShare): it
renders every batch (in lockstep with the others), records only the rows its devices computed, in its
own manifest shard; the processes agree on the batches left before anything renders; a lost peer
(MeshPeerLost) ends the run instead of failing results."""

from __future__ import annotations

import pytest

from flowgen.engine import MeshPeerLost
from flowgen.errors import FlowgenError
from flowgen.run.distributed import ProcessShare
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.merge import MergedView
from flowgen.run.regen import job_of, replay
from flowgen.run.shards import Shard
from tests.workflow.direct_runs import item, plan_of


class HalfMesh(FakeEngine):
    """A stand-in for process 1 of 2 on a 4-device mesh: it keeps the second half of each batch."""

    def own_rows(self, rows: int) -> list[int]:
        return list(range(rows // 2, rows))


class Exchange:
    """The coordination service's key-value store as process 1 of 2 sees it: process 0 publishes what
    `theirs` says under a name (default: the same value as this process)."""

    def __init__(self, **theirs: str):
        self.theirs, self.published = theirs, []

    def __call__(self, name: str, value: str) -> list[str]:
        self.published.append((name, value))
        return [self.theirs.get(name.replace("/", "_"), value), value]


def test_a_process_renders_every_batch_and_records_the_rows_of_its_devices(tmp_path):
    out = tmp_path / "out"
    items = [item(f"k{i}") for i in range(8)]
    engine, exchange = HalfMesh(), Exchange()
    summary = execute(against_folder(plan_of(items, out)), engine, share=ProcessShare(1, 2, exchange=exchange))
    assert [len(call.prompts) for call in engine.calls] == [4, 4]  # every batch, as one process would run it
    assert summary.rendered == 4 and summary.exit_code == 0
    # agreed before rendering, and before each batch whether to go on
    assert [name for name, _ in exchange.published] == ["todo", "halt/batch/0", "halt/batch/1"]
    with Shard(1, 2).manifest(out) as manifest:
        recorded = sorted(r["item_key"] for r in manifest.records())
        positions = {r["batch"]["position"] for r in manifest.records()}
    assert positions == {2, 3} and len(recorded) == 4  # its rows only, in its own manifest shard
    assert sorted(p.name for p in (out / "img").iterdir()) == sorted(f"{key}_0.png" for key in recorded)


def test_processes_that_found_other_work_left_stop_before_rendering(tmp_path):
    out = tmp_path / "out"
    engine = HalfMesh()
    with pytest.raises(FlowgenError) as err:
        execute(against_folder(plan_of([item("k0")], out)), engine, share=ProcessShare(1, 2, exchange=Exchange(todo="x")))
    assert "process 0 found other work left to do than process 1" in str(err.value) and "\n" not in str(err.value)
    assert engine.calls == [] and not (out / "img").exists()


class LostPeer(HalfMesh):
    def generate_batch(self, request):
        raise MeshPeerLost("a process of the device mesh cannot be reached (Connection closed by peer)")


def test_a_lost_peer_ends_the_run_without_failing_a_result(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MeshPeerLost):
        execute(against_folder(plan_of([item("k0"), item("k1")], out)), LostPeer(), share=ProcessShare(1, 2, exchange=Exchange()))
    with MergedView(out) as view:
        assert len(view.index()) == 0  # nothing recorded as failed: a rerun renders them


def test_a_lost_peer_during_a_replay_is_not_a_drifted_engine(tmp_path):
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("k0")], out)), FakeEngine())
    with MergedView(out) as view:
        [record] = [view.get(*rid) for rid in view.index()]
    with pytest.raises(MeshPeerLost):  # the canary and regen end, rather than report the item as drifted
        replay(record, job_of(record), [], LostPeer())


def test_a_process_stops_where_another_one_would(tmp_path):
    out = tmp_path / "out"
    engine = HalfMesh()
    share = ProcessShare(1, 2, exchange=Exchange(halt_batch_1="budget"))  # process 0's --budget ends after a batch
    summary = execute(against_folder(plan_of([item(f"k{i}") for i in range(8)], out)), engine, share=share)
    assert len(engine.calls) == 1 and summary.budget_stopped and summary.rendered == 2
