"""The best evaluated checkpoint outlives Ray's retention: keep_best copies what an export reads and
points best.json at it last, so a copy cut short is never pointed at."""

import json

from pipelines.worker import BEST_FILES, best_checkpoint, keep_best


def fake_checkpoint(directory, step):
    directory.mkdir(parents=True)
    for name in BEST_FILES:
        (directory / name).write_text(f"{name} at {step}")
    (directory / "state.pt").write_text("training state: not needed by an export")
    return directory


def test_keep_best_replaces_the_previous_best_and_points_at_it(tmp_path):
    run = tmp_path / "run"
    assert best_checkpoint(str(run)) is None
    keep_best(str(run), fake_checkpoint(tmp_path / "c10", 10), 10, 5.0)
    keep_best(str(run), fake_checkpoint(tmp_path / "c30", 30), 30, 4.0)
    uri, record = best_checkpoint(str(run))
    assert record == {"step": 30, "value": 4.0, "checkpoint": "checkpoint_0000030"}
    assert uri == f"{run}/best/checkpoint_0000030"
    assert sorted(p.name for p in (run / "best").iterdir()) == ["best.json", "checkpoint_0000030"]  # the older copy is gone
    assert sorted(p.name for p in (run / "best/checkpoint_0000030").iterdir()) == sorted(BEST_FILES)  # no training state
    assert (run / "best/checkpoint_0000030/weights.safetensors").read_text() == "weights.safetensors at 30"


def test_a_copy_cut_short_is_never_pointed_at(tmp_path):
    run = tmp_path / "run"
    keep_best(str(run), fake_checkpoint(tmp_path / "c10", 10), 10, 5.0)
    (run / "best/checkpoint_0000020").mkdir()  # a later copy that died before best.json was rewritten
    uri, record = best_checkpoint(str(run))
    assert record["step"] == 10 and uri.endswith("checkpoint_0000010")
    assert json.loads((run / "best/best.json").read_text())["step"] == 10


def test_a_history_whose_last_row_has_more_columns_round_trips(tmp_path):
    """A sweep trial's last evaluation adds Inception `fid` to the curve: the CSV has every column, blank where absent."""
    from pipelines.worker import history_csv, read_history

    history = [{"step": 10, "fid_classifier": 5.0}, {"step": 20, "fid_classifier": 4.0, "fid": 300.0}]
    (tmp_path / "evaluation.csv").write_text(history_csv(history))
    assert (tmp_path / "evaluation.csv").read_text().splitlines()[0] == "step,fid_classifier,fid"
    assert read_history(tmp_path, "evaluation.csv") == history
