"""Driver-side outputs without a Ray runtime: results.csv rows and statuses, TensorBoard scalars with
HParams records (read back with TensorBoard's own readers), and storage on a URI (file://)."""
from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest
from ray.tune.experiment import Trial
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from reid_core.config import Config, flatten
from study.layout import RESULTS_FILE
from study.record.common import FIXED_COLUMNS, TrialInfo
from study.record.console import Progress
from study.record.results_csv import ResultsCsv
from study.record.tensorboard import TensorBoardHParams
from study.record.hparams import run_name
from study.results.load import read_results
from study.space import load_space
from study.trial.worker import empty_state, result_of, update_state
from study.driver.storage import StudyStorage
from study.results.summary import closing_summary

NAN = float("nan")


def result(epoch: int, evaluated_at: int, mAP: float, best: float, best_epoch: int) -> dict:
    out = {"epoch": epoch, "eval_epoch": evaluated_at, "loss/total": 3.0 / epoch, "lr": 0.001, "hard/neg": 12.0,
           "training_iteration": epoch, "time_this_iter_s": 1.0, "start_epoch": 0, "world_size": 1,
           "ddp_backend": "gloo"}
    for key in ("mAP", "R1", "R5", "R10", "mINP"):
        out[key] = mAP if evaluated_at else NAN
        out[f"best_{key}"] = best if evaluated_at else NAN
    out["best_epoch"] = best_epoch
    out["best_cmc"] = [best + i for i in range(20)] if evaluated_at else []
    return out


@pytest.fixture()
def setup(tmp_path):
    space = load_space("quickstart", ["train.epochs=3"])
    info = TrialInfo(space.base, space.searched_keys)
    storage = StudyStorage(tmp_path, "demo")
    trials = [Trial("train_trial", config={"loss.name": name, "loss.normalize": False, "framework.name": fw,
                                           "cell": i}, trial_id=f"t{i}", stub=True)
              for i, (name, fw) in enumerate([("he", "moreid"), ("triplet", "baseline"), ("npair", "moreid")])]
    return space, info, storage, trials


def test_results_csv_rows_statuses_and_columns(setup):
    space, info, storage, (a, b, c) = setup
    cb = ResultsCsv(storage, "demo", info)
    cb.setup()
    cb.on_trial_start(0, [], a)
    rows = list(csv.DictReader(storage.path(RESULTS_FILE).open()))
    assert rows[0]["status"] == "RUNNING" and rows[0]["epochs"] == "0" and rows[0]["final_mAP"] == ""
    cb.on_trial_result(0, [], a, result(1, 0, NAN, NAN, 0))  # trained, not evaluated yet
    cb.on_trial_result(0, [], a, result(2, 2, 12.5, 12.5, 2))
    a.update_last_result(result(3, 3, 11.0, 12.5, 2))  # what Tune does before calling back
    cb.on_trial_result(0, [], a, a.last_result)
    cb.on_trial_complete(0, [], a)
    cb.on_trial_start(0, [], b)
    b.update_last_result(result(1, 1, 4.0, 4.0, 1))
    cb.on_trial_result(0, [], b, b.last_result)
    cb.on_trial_complete(0, [], b)  # stopped by the scheduler after 1 of 3 epochs
    cb.on_trial_start(0, [], c)
    cb.on_trial_recover(0, [], c)
    cb.on_trial_error(0, [], c)

    text = storage.path(RESULTS_FILE).read_text()
    header = text.splitlines()[0].split(",")
    config_keys = list(flatten(Config()))
    assert header == [*FIXED_COLUMNS, *config_keys]
    assert not list(storage.local.glob(".results.csv.*"))  # the temporary file was renamed into place
    table = pd.read_csv(storage.path(RESULTS_FILE))
    assert list(table.trial_id) == ["t0", "t1", "t2"]
    assert list(table.status) == ["TERMINATED", "STOPPED", "ERROR"]
    assert list(table.epochs) == [3, 1, 0]
    first = table.iloc[0]
    assert first.final_mAP == 11.0 and first.best_mAP == 12.5 and first.best_epoch == 2
    assert json.loads(first.cmc) == [12.5 + i for i in range(20)]
    assert first.searched == "loss.name;loss.normalize;framework.name"
    assert first["loss.name"] == "he" and first["framework.name"] == "moreid" and first["train.epochs"] == 3
    assert math.isnan(table.iloc[2].final_mAP)  # never evaluated: an empty cell
    # The results module reads it as the contract says.
    frame = read_results(storage.local)
    assert list(frame.status) == ["TERMINATED", "STOPPED", "ERROR"]

    # State survives a driver restart: through Tune's callback state, or from the file itself.
    again = ResultsCsv(storage, "demo", info)
    again.set_state(cb.get_state())
    assert again.rows == cb.rows and again.order == cb.order
    from_file = ResultsCsv(storage, "demo", info)
    from_file.setup()
    assert from_file.order == ["t0", "t1", "t2"] and from_file.rows["t1"]["status"] == "STOPPED"


def test_tensorboard_scalars_and_hparams_in_one_run_per_trial(setup):
    space, info, storage, (a, b, _) = setup
    cb = TensorBoardHParams(storage, info, space)
    cb.setup()
    for trial, values in ((a, [(1, 1, 5.0), (2, 2, 9.0)]), (b, [(1, 1, 3.0)])):
        cb.on_trial_start(0, [], trial)
        for epoch, evaluated, mAP in values:
            cb.on_trial_result(0, [], trial, result(epoch, evaluated, mAP, mAP, epoch))
    cb.on_trial_complete(0, [], a)
    cb.on_trial_error(0, [], b)

    # Readable run names, numbered in start order; the experiment summary in the folder itself.
    first, second = "001 loss.name=he normalize=False framework.name=moreid", \
        "002 loss.name=triplet normalize=False framework.name=baseline"
    runs = sorted(p.name for p in storage.path("tensorboard").iterdir() if p.is_dir())
    assert runs == [first, second]
    root = EventAccumulator(str(storage.path("tensorboard")))
    root.Reload()
    experiment = metadata.parse_experiment_plugin_data(
        root.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["eval/mAP", "best/mAP"]
    assert [h.name for h in experiment.hparam_infos] == ["loss.name", "loss.normalize", "framework.name"]
    assert list(experiment.hparam_infos[0].domain_discrete) and \
        {v.string_value for v in experiment.hparam_infos[0].domain_discrete.values} == \
        {"triplet", "npair", "ranked_list", "he"}
    assert run_name(12, {"optim.lr": 1e-3, "loss.name": "a/b"}) == "012 lr=0.001 name=a-b"
    acc = EventAccumulator(str(storage.path(f"tensorboard/{first}")))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"eval/mAP", "eval/R1", "eval/mINP", "best/mAP", "loss/total", "lr", "hard/neg"} <= scalars
    assert "world_size" not in scalars and "epoch" not in scalars
    assert [(e.step, e.value) for e in acc.Scalars("eval/mAP")] == [(1, 5.0), (2, 9.0)]
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: v for k, v in start.hparams.items()}
    assert hparams["loss.name"].string_value == "he"
    assert hparams["framework.name"].string_value == "moreid"
    assert hparams["loss.normalize"].bool_value is False
    assert "train.seed" not in hparams and "data.dataset" not in hparams  # constant: not a column
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS
    acc_b = EventAccumulator(str(storage.path(f"tensorboard/{second}")))
    acc_b.Reload()
    end_b = metadata.parse_session_end_info_plugin_data(
        acc_b.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG])
    assert end_b.status == api_pb2.STATUS_FAILURE


def test_uri_storage_writes_locally_and_copies_to_the_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MOREID_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket"
    storage = StudyStorage(f"file://{remote}", "study1")
    assert storage.remote and storage.uri == f"file://{remote}/study1"
    storage.write_text("results.csv", "a,b\n1,2\n")
    assert (tmp_path / "cache" / "studies" / "study1" / "results.csv").read_text() == "a,b\n1,2\n"
    assert (remote / "study1" / "results.csv").read_text() == "a,b\n1,2\n"
    assert not list((remote / "study1").glob("*.tmp"))
    (storage.path("tensorboard/t0")).mkdir(parents=True)
    (storage.path("tensorboard/t0/events.x")).write_bytes(b"\x00\x01")
    storage.upload("tensorboard/t0")
    assert (remote / "study1" / "tensorboard" / "t0" / "events.x").read_bytes() == b"\x00\x01"
    assert storage.read_text("results.csv") == "a,b\n1,2\n" and storage.read_text("nothing.json") is None
    local = StudyStorage(tmp_path / "plain", "study2")
    assert not local.remote and local.local == (tmp_path / "plain" / "study2").resolve()


def test_results_csv_epoch_results_are_written_in_the_background_at_most_every_period(setup, monkeypatch):
    space, info, storage, (a, b, _) = setup
    cb = ResultsCsv(storage, "demo", info)
    cb.setup()
    cb.on_trial_start(0, [], a)
    first = storage.path(RESULTS_FILE).stat().st_mtime_ns
    cb.on_trial_result(0, [], a, result(1, 1, 5.0, 5.0, 1))  # within the period: no rewrite yet
    assert storage.path(RESULTS_FILE).stat().st_mtime_ns == first
    monkeypatch.setattr("study.record.results_csv.CSV_WRITE_PERIOD_S", 0.0)
    cb.on_trial_result(0, [], a, result(2, 2, 7.0, 7.0, 2))  # period over: rewritten by a background thread
    cb._thread.join()
    assert pd.read_csv(storage.path(RESULTS_FILE)).iloc[0].best_mAP == 7.0
    cb.on_trial_start(0, [], b)  # an older background text never replaces a newer synchronous one
    cb._store("stale,text\n", 1)
    assert len(pd.read_csv(storage.path(RESULTS_FILE))) == 2
    cb.on_experiment_end([])


def test_progress_prints_one_line_per_trial_and_evaluation_with_a_study_bar(setup):
    import io

    space, info, storage, (a, b, c) = setup
    out = io.StringIO()
    progress = Progress(info, "mAP", total=3, stream=out)
    progress.setup()
    for trial in (a, b):
        trial.set_status(Trial.RUNNING)
    for trial in (a, b):
        progress.on_trial_start(0, [a, b, c], trial)
    progress.on_trial_result(0, [a, b, c], a, {**result(1, 0, NAN, NAN, 0), "epoch_s": 2.0})  # not evaluated
    progress.on_trial_result(0, [a, b, c], a, {**result(2, 2, 12.5, 12.5, 2), "epoch_s": 2.5})
    a.update_last_result(result(3, 3, 11.0, 12.5, 2))
    progress.on_trial_complete(0, [a, b, c], a)  # Tune marks it TERMINATED after its callbacks ran
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # 2 starts, 1 evaluation (epoch 1 was not evaluated), 1 end
    assert "t0 started: loss.name=he" in lines[0] and "| [" in lines[0] and "0/3 done, 2 running" in lines[0]
    assert "t0 epoch 2/3" in lines[2] and "mAP 12.50 (best 12.50 @ 2)" in lines[2] and "2.5 s" in lines[2]
    assert "t0 finished, best mAP 12.50" in lines[3] and "1/3 done, 1 running" in lines[3] and "ETA" in lines[3]


def test_closing_summary_names_the_winning_cell_and_the_evidence():
    table = pd.DataFrame({"loss.name": ["he", "triplet", "he", "triplet"], "framework.name": ["moreid"] * 4,
                          "train.seed": [0, 0, 1, 1], "best_mAP": [20.0, 18.0, 22.0, 17.0]})
    one_seed = closing_summary(table[table["train.seed"] == 0], ["loss.name", "framework.name"])
    assert one_seed[0] == "winner: loss.name=he framework.name=moreid: mAP 20.00 (one trial, one seed)"
    assert one_seed[1].startswith("runner-up: loss.name=triplet framework.name=moreid: mAP 18.00, 2.00 points")
    assert "One seed is not evidence" in one_seed[2] and "python -m study.run fidelity" in one_seed[2]
    seeds = closing_summary(table, ["loss.name", "framework.name", "train.seed"])
    assert seeds[0].startswith("winner: loss.name=he framework.name=moreid: mAP 21.00 (mean of 2 seeds")
    assert not any("One seed" in line for line in seeds)
    assert "python -m study.results <study folder> --table directions" in seeds[-1]
    assert closing_summary(table.assign(best_mAP=NAN), ["loss.name"]) == []


def test_a_resumed_one_worker_trial_finds_the_newest_complete_checkpoint_in_its_folder(tmp_path):
    """A killed driver's snapshot may predate a trial's newest checkpoints: the trial looks in its folder,
    newest first, and passes over a copy cut short (truncated checkpoint.pt) or one without its state."""
    import torch

    from study.trial.worker import STATE_FILE, persisted_checkpoints

    trial = tmp_path / "trial_0001"
    for index, epoch in enumerate((1, 2, 3, 4)):
        folder = trial / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch, "weights": torch.zeros(1000)}, folder / "checkpoint.pt")
        (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    whole = (trial / "checkpoint_000003" / "checkpoint.pt").read_bytes()
    (trial / "checkpoint_000003" / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])  # cut short
    (trial / "checkpoint_000002" / STATE_FILE).unlink()  # copied without its study state
    (trial / "checkpoint_extra").mkdir()  # not Tune's
    found = persisted_checkpoints(str(trial))
    assert [p.rsplit("/", 1)[-1] for p in (c.path for c in found)] == ["checkpoint_000001", "checkpoint_000000"]
    with found[0].as_directory() as folder:
        assert torch.load(f"{folder}/checkpoint.pt")["epoch"] == 2
    assert persisted_checkpoints(str(tmp_path / "missing")) == []
    assert persisted_checkpoints(f"file://{trial}")[0].path.endswith("checkpoint_000001")


def test_study_results_carry_rerank_columns(tmp_path):
    state = empty_state()
    evaluation = {"mAP": 40.0, "R1": 60.0, "R5": 70.0, "R10": 75.0, "mINP": 10.0, "cmc": [60.0] * 20,
                  "mAP_rerank": 50.0, "R1_rerank": 65.0, "R5_rerank": 72.0, "R10_rerank": 77.0, "mINP_rerank": 20.0}
    update_state(state, evaluation, 1, "mAP", "max")
    result = result_of({"epoch": 1, "loss/total": 1.0}, state, 0)
    assert result["mAP_rerank"] == 50.0 and result["best_mINP_rerank"] == 20.0

    space = load_space("quickstart")
    storage = StudyStorage(tmp_path, "demo")
    trial = Trial("train_trial", config={"loss.name": "he"}, trial_id="t0", stub=True)
    callback = ResultsCsv(storage, "demo", TrialInfo(space.base, space.searched_keys))
    callback.setup()
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, result)
    callback.on_experiment_end([])  # epoch results reach the file within seconds; the study's end writes them
    with storage.path(RESULTS_FILE).open() as handle:
        reader = csv.DictReader(handle)
        row = next(reader)
        columns = reader.fieldnames
    at = len(FIXED_COLUMNS)
    assert columns[at:at + 2] == ["final_mAP_rerank", "best_mAP_rerank"]
    assert float(row["final_mAP_rerank"]) == 50.0 and float(row["best_R10_rerank"]) == 77.0
