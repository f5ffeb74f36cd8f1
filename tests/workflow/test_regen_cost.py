"""What `regen` costs (issue 18, item 23): results that replay alike share one engine call at their
recorded batch size (an item's results, or several items of a batch, were one call each), the cost
is said on the last line, and the grouped replay stays bit for bit on the real tiny model.

Why the recorded batch size stays (measured, not a contract, so not pinned by a test): on XLA:CPU
the tiny model's sampling loop gives a row of a batch of 8 floats ~1e-5 away from the same row at
batch 1, and the VAE decode differs by batch size too; at 256x256 some pixels then differ by one
level. A smaller batch cannot promise the recorded bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import execute
from flowgen.run.manifest import Manifest
from flowgen.run.regen import job_of, regenerate, replay_key, resolve_targets
from tests.workflow.direct_runs import item, plan_of, reference

# renders a batch of eight on the tiny model first
pytestmark = pytest.mark.slow


def rendered(tmp_path: Path, items: list) -> Path:
    out = tmp_path / "out"
    assert execute(plan_of(items, out).against({}), FakeEngine()).exit_code == 0  # a new folder: against nothing
    return out


def records_of(out: Path, targets: list[str]) -> list[dict]:
    with Manifest(out) as manifest:
        return resolve_targets(manifest, targets)


def item_id(out: Path, key: str) -> str:
    with Manifest(out) as manifest:
        return next(r["item_id"] for r in manifest.records() if r["item_key"] == key)


def test_an_items_results_replay_in_one_call_at_the_recorded_batch_size(tmp_path):
    out = rendered(tmp_path, [item("a", numberResults=3), item("b")])  # one batch of 4: a#0..2, b#0
    engine = FakeEngine()
    outcomes = regenerate(records_of(out, [item_id(out, "a")]), tmp_path / "again", engine_for=lambda m, d: engine)
    assert [o.matches for o in outcomes] == [True] * 3
    [call] = engine.calls  # was one call of 4 per result
    assert len(call.prompts) == 4 and call.seeds[:3] == [r["seed"] for r in records_of(out, [item_id(out, "a")])]
    assert call.seeds[3] == call.seeds[2]  # the padding is a copy of the last row
    assert {(o.call, o.batch_size) for o in outcomes} == {(0, 4)}


def test_items_of_several_batches_share_calls_up_to_the_batch_size(tmp_path):
    out = rendered(tmp_path, [item(f"k{i}") for i in range(6)] + [item("big", width=128)])  # 4 + 2 + 1 (another size)
    records = records_of(out, [item_id(out, key) for key in ("k0", "k5", "k1", "k4", "k2", "big")])
    engine = FakeEngine()
    outcomes = regenerate(records, tmp_path / "again", engine_for=lambda m, d: engine)
    assert all(o.matches for o in outcomes) and [o.item_id for o in outcomes] == [r["item_id"] for r in records]
    sizes = sorted((len(c.prompts), c.width) for c in engine.calls)
    # k0..k5 were batches of 4 and 2: k0, k1, k2 (batch 4) share one call; k5, k4 (batch 2) one; big alone
    assert sizes == [(1, 128), (2, 64), (4, 64)]


def test_only_rows_that_replay_alike_share_a_call(tmp_path):
    one, two = reference(tmp_path, "one.png", 40), reference(tmp_path, "two.png", 90)
    out = rendered(tmp_path, [item("a", refs=(one,)), item("b", refs=(two,)), item("c", refs=(one,)),
                              item("d", refs=(one,), steps=3)])
    a, b, c, d = (records_of(out, [item_id(out, key)])[0] for key in "abcd")
    assert replay_key(a, job_of(a)) == replay_key(b, job_of(b))  # per-row references: any rows
    assert replay_key(a, job_of(a)) != replay_key(d, job_of(d))  # another program
    shared = [{**r, "batch": {**r["batch"], "reference_layout": "shared"}} for r in (a, b, c)]
    keys = [replay_key(r, job_of(r)) for r in shared]
    assert keys[0] == keys[2] != keys[1]  # one reference set for the whole batch: the same set only
    legacy = [{**r, "batch": {k: v for k, v in r["batch"].items() if k != "reference_layout"}} for r in (a, c)]
    assert replay_key(legacy[0], job_of(legacy[0])) != replay_key(legacy[1], job_of(legacy[1]))  # alone, as before


def test_regen_says_what_it_cost(tmp_path, monkeypatch):
    out = rendered(tmp_path, [item("a", numberResults=3), item("b")])
    monkeypatch.setattr("flowgen.run.regen._pipeline_engine", lambda model, dtype: FakeEngine(dtype=dtype))
    result = CliRunner().invoke(main, ["regen", str(out), item_id(out, "a"), "--verify", "--to", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    *verdicts, cost = result.output.strip().splitlines()
    assert [line.split()[0] for line in verdicts] == ["identical"] * 3
    assert cost.startswith("cost: 3 result(s) in 1 engine call(s) at the recorded batch size 4 (4 rows computed: "
                           "another batch size would change the bytes), ") and cost.endswith(" s")


# --- the real tiny model: grouped replays stay bit for bit, and why the batch size stays --------


TINY_RECIPE = """\
version: 1
name: eight
model: flux2-klein-tiny
seed: 7
datasets:
  subjects: {values: [a red bicycle, a lighthouse at dusk, a bowl of lemons, a paper crane]}
matrix: {subject: subjects}
task: {positivePrompt: "A photo of {subject}", width: 128, height: 128, steps: 2, numberResults: 2, outputFormat: PNG}
output: {dir: out, filename: "{slug}_{result}.{ext}"}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from flowgen.commands.run import run_command

    folder = tmp_path_factory.mktemp("tiny")
    (folder / "recipe.yaml").write_text(TINY_RECIPE)
    assert run_command(str(folder / "recipe.yaml"), None, (), None, False, 8) == 0
    return folder / "out"


def test_two_items_of_a_batch_of_eight_replay_in_one_call_bit_for_bit(tiny_run, tmp_path):
    from flowgen.run import engine as run_engine

    records = records_of(tiny_run, [item_id(tiny_run, "subject=a paper crane"), item_id(tiny_run, "subject=a red bicycle")])
    assert [r["batch"]["size"] for r in records] == [8] * 4 and len({r["batch"]["position"] for r in records}) == 4
    pipe = next(p for (name, *_), p in run_engine._LOADED.items() if name == "flux2-klein-tiny")
    loops = pipe.counters["denoise"]
    outcomes = regenerate(records, tmp_path / "again")
    assert [o.matches for o in outcomes] == [True] * 4, outcomes
    assert pipe.counters["denoise"] - loops == 1  # four results, one sampling loop of 8 (was four)
