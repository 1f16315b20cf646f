"""`capture --replay`: a recording comes out as it went in, with the identity of the node it was made on."""

import json

from flowscope.cli import main
from tests.ui.scenario import shop_batches, write_replay


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_capture_replays_a_recording_unchanged_and_names_nothing_from_this_machine(tmp_path):
    batches = shop_batches()
    recording = write_replay(tmp_path / "shop.jsonl", batches)
    out = tmp_path / "out.jsonl"

    assert main(["capture", "--replay", str(recording), "-o", "jsonl", "--file", str(out)]) == 0

    written, recorded = records(out), records(recording)
    summary = written.pop()
    assert summary["type"] == "summary"
    assert summary["intervals"] == 5
    assert summary["identity"] is None  # no identity flags: nothing was looked up on this machine
    assert [r for r in written if r["type"] == "flow"] == [r for r in recorded if r["type"] == "flow"]
    assert [r for r in written if r["type"] == "event"] == [r for r in recorded if r["type"] == "event"]
    assert len([r for r in written if r["type"] == "flow"]) == sum(len(batch.flows) for batch in batches) == 22
