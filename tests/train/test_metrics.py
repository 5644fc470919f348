"""The run's metrics file (train/metrics.py): a last line torn by a kill mid-write is skipped,
named, and gone for good once a resume truncates the log after its checkpoint's step. No model,
no engine."""

import json

from lorasync.train.metrics import MetricsLog


def test_a_torn_last_metrics_line_is_skipped_and_named(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "reward_mean": 0.5})
    with log.path.open("a") as f:
        f.write('{"step": 2, "rew')  # a kill mid-write
    assert log.rows() == [{"step": 1, "reward_mean": 0.5}]
    assert "torn last line" in capsys.readouterr().err
    log.truncate_after(1)  # what resume does: the torn line is gone for good
    assert log.path.read_text() == json.dumps({"step": 1, "reward_mean": 0.5}) + "\n"
    log.close()
