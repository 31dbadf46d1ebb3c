"""Task metrics and run facts never collide: metrics.json is {"metrics", "before", "run"}, and every reader
(report tables, compare) goes through tunelab.results.read_metrics. (Every family's keys surviving a real
run is checked in test_task_runs.test_two_steps_through_the_loop.)"""

import json

from tunelab.report.tables import read_run
from tunelab.results import read_metrics

NER = {"metrics": {"f1": 0.5, "precision": 0.25, "recall": 0.75, "n": 4},
       "before": {"f1": 0.1, "precision": 0.05, "recall": 0.2, "n": 4},
       "run": {"method": "lora", "task": "ner", "precision": "float32", "steps": 2, "train_tokens_per_s": 10.0}}


def test_report_row_keeps_the_entity_precision(tmp_path):
    run = tmp_path / "lora-s0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(NER))
    row = read_run(run)
    assert row["precision"] == 0.25 and isinstance(row["precision"], float)  # not "float32"
    assert row["run.precision"] == "float32" and row["method"] == "lora" and row["steps"] == 2
    assert row["before.precision"] == 0.05
    assert read_metrics(run) == NER


def test_legacy_flat_files_still_read(tmp_path):
    run = tmp_path / "old-s0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "n": 8, "method": "full", "steps": 3}))
    rec = read_metrics(run)
    assert rec["metrics"] == {"accuracy": 0.9, "n": 8} and rec["run"] == {"method": "full", "steps": 3}
    assert read_run(run)["accuracy"] == 0.9
