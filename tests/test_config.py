import pytest

from tunelab.config import apply_overrides, dump_config, load_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model: smollm2-135m\nmethod: full\n"), ["train.lr=3e-4", "data.max_train=10", "task.name=sentiment"])
    assert cfg.model.name == "smollm2-135m" and cfg.method.name == "full"
    assert cfg.train.lr == 3e-4 and cfg.data.max_train == 10
    assert cfg.run_dir().name == "sentiment-full"


def test_unknown_key_suggests_closest(tmp_path):
    # too far from any key for a suggestion: the message names the key and lists the valid ones
    with pytest.raises(ValueError, match=r"unknown key 'train\.learning_rat'; valid keys here: .*\blr\b"):
        load_config(write(tmp_path, "train: {learning_rat: 1.0}\n"))
    with pytest.raises(ValueError, match=r"did you mean 'batch_size'"):
        load_config(None, ["train.batchsize=4"])


def test_sweep_section_in_a_single_run_points_at_its_command(tmp_path):
    with pytest.raises(ValueError, match=r"'compare' is a sweep section, read by `tunelab compare CONFIG`"):
        load_config(write(tmp_path, "model: smollm2-135m\ncompare: {methods: [lora]}\n"))


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size"):
        load_config(None, ["train.batch_size=-1"])
    with pytest.raises(ValueError, match=r"train.schedule"):
        load_config(None, ["train.schedule=cubic"])


def test_unknown_method_and_param(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean 'full'"):
        load_config(None, ["method.name=fulll"])
    with pytest.raises(ValueError, match=r"bad parameters for method 'full'"):
        load_config(None, ["method.rank=4"])
    with pytest.raises(ValueError, match=r"unknown task 'sentimnt'.*did you mean 'sentiment'"):
        load_config(None, ["task.name=sentimnt"])


def test_override_syntax_and_types():
    raw = apply_overrides({"method": "full"}, ["method.name=full", "train.epochs=2", "data.pack=true"])
    assert raw == {"method": {"name": "full"}, "train": {"epochs": 2}, "data": {"pack": True}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["task.name=paraphrase", "task.formulation=head", "train.seed=3"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
