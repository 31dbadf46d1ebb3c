"""Resume bookkeeping: whole-run tokens/time/loss survive a resume; a finished run's rerun keeps its
metrics.json; a kill before the first checkpoint or a half-written log line never duplicates or breaks
log.jsonl; a corrupt last checkpoint falls back to the previous one (exactly)."""

import json

import pytest

import tunelab.training.loop as train_mod
from test_train import cfg_for, data, losses  # noqa: F401  (fixtures)

STEPS = ["train.max_steps=9", "train.save_every=4", "train.grad_accum=2"]


class Crash(Exception):
    pass


def crash_at(monkeypatch, step):
    real = train_mod.check_step

    def check(s, *a):
        if s == step:
            raise Crash
        return real(s, *a)

    monkeypatch.setattr(train_mod, "check_step", check)
    return lambda: monkeypatch.setattr(train_mod, "check_step", real)


@pytest.fixture
def full(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    return out, train_mod.run(cfg_for(tiny_dir, data, out, *STEPS))


def test_resumed_run_reports_whole_run_figures(full, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    part = tmp_path / "part"
    undo = crash_at(monkeypatch, 6)
    with pytest.raises(Crash):
        train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    undo()
    rec = train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    whole = full[1]["run"]
    assert rec["run"]["train_tokens"] == whole["train_tokens"]  # not just the 5 steps after the resume
    assert rec["run"]["final_loss"] == whole["final_loss"]
    assert rec["run"]["mean_train_loss"] == pytest.approx(whole["mean_train_loss"])
    assert rec["run"]["train_time_s"] > 0 and rec["run"]["steps"] == 9


def test_rerunning_a_finished_run_keeps_its_metrics(full, tiny_dir, data):  # noqa: F811
    out, first = full
    saved, logged = (out / "metrics.json").read_bytes(), losses(out)
    again = train_mod.run(cfg_for(tiny_dir, data, out, *STEPS))
    assert (out / "metrics.json").read_bytes() == saved and again == json.loads(saved)
    # A changed eval setting re-scores, but the training figures stay the whole run's (not NaN / 0 tokens)
    other = train_mod.run(cfg_for(tiny_dir, data, out, *STEPS, "eval.batch_size=3"))
    assert other["run"]["train_tokens"] == first["run"]["train_tokens"]
    assert other["run"]["final_loss"] == first["run"]["final_loss"]
    assert losses(out) == logged and len(logged) == 9  # re-running trains nothing and logs nothing again


def test_kill_before_first_checkpoint_does_not_duplicate_the_log(full, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    part = tmp_path / "part"
    undo = crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    undo()
    assert len(losses(part)) == 2  # steps 1, 2 logged, no checkpoint yet
    train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    assert losses(part) == losses(full[0])


def test_half_written_log_line_is_dropped_on_resume(full, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    part = tmp_path / "part"
    undo = crash_at(monkeypatch, 6)
    with pytest.raises(Crash):
        train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    undo()
    with open(part / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')  # the disk filled up mid-line
    train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    assert losses(part) == losses(full[0])


def _truncate(ckpt):
    f = ckpt / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_json(ckpt):
    (ckpt / "state.json").write_text('{"position": {"step": 8,')


def _past_end(ckpt):
    state = json.loads((ckpt / "state.json").read_text())
    state["position"]["step"] = 99
    (ckpt / "state.json").write_text(json.dumps(state))


def _wrong_shape(ckpt):
    from safetensors.torch import load_file, save_file

    f = ckpt / "trainable.safetensors"
    t = load_file(str(f))
    key = sorted(t)[0]
    t[key] = t[key].reshape(-1)[:-1].clone()  # one element short: loading it would be a RuntimeError
    save_file(t, str(f))


def _state_field(key, value):
    def corrupt(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        state["position"][key] = value
        (ckpt / "state.json").write_text(json.dumps(state))

    return corrupt


@pytest.mark.parametrize("corrupt, why", [(_truncate, "unreadable safetensors"), (_bad_json, "unreadable checkpoint state"),
                                          (_past_end, "past the end"), (_wrong_shape, "has shape"),
                                          (_state_field("batch", 40), "past the end of an epoch"),
                                          (_state_field("batch", 1), "is not where step 6 ends"),
                                          (_state_field("epoch", -1), "position.epoch is -1"),
                                          (_state_field("loss", "x"), "position.loss")])
def test_corrupt_last_checkpoint_falls_back_to_the_previous(corrupt, why, full, tiny_dir, data, tmp_path, monkeypatch, capsys):  # noqa: F811
    part = tmp_path / "part"
    steps = ["train.max_steps=9", "train.save_every=3", "train.grad_accum=2"]
    undo = crash_at(monkeypatch, 8)
    with pytest.raises(Crash):
        train_mod.run(cfg_for(tiny_dir, data, part, *steps))
    undo()
    ckpt = part / "checkpoints"
    assert json.loads((ckpt / "prev" / "state.json").read_text())["position"]["step"] == 3
    corrupt(ckpt / "last")  # the step-6 checkpoint
    train_mod.run(cfg_for(tiny_dir, data, part, *steps))
    out = capsys.readouterr()
    assert why in out.out + out.err and "trying the previous one" in out.out + out.err
    ref = tmp_path / "ref"
    train_mod.run(cfg_for(tiny_dir, data, ref, *steps))
    assert losses(part) == losses(ref)


def test_no_usable_checkpoint_is_a_clear_error(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))
    _bad_json(out / "checkpoints" / "last")
    with pytest.raises(ValueError, match="no usable checkpoint.*train.resume=false"):
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=3"))
