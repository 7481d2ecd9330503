import pytest

from reinseg.config import ConfigError, ModelConfig, from_dict, to_dict


def test_round_trip_through_plain_dicts():
    config = from_dict(ModelConfig, {"backbone": {"name": "eva02_vitl14"}, "rein": {"lora_dim": None}}, "model")
    assert config.backbone.name == "eva02_vitl14" and config.rein.lora_dim is None
    assert from_dict(ModelConfig, to_dict(config), "model") == config


def test_unknown_keys_suggest_the_closest_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.backbone.nmae'; did you mean 'name'\?"):
        from_dict(ModelConfig, {"backbone": {"nmae": "dinov2_vitl14"}}, "model")
    with pytest.raises(ConfigError, match="unknown config key 'model.zzz'; known keys: tuning, backbone, rein"):
        from_dict(ModelConfig, {"zzz": 1}, "model")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rein": {"lora_dim": "sixteen"}}, "model.rein.lora_dim must be an integer"),
        ({"head": {"num_classes": None}}, "model.head.num_classes may not be null"),
        ({"test": {"flip": "yes"}}, "model.test.flip must be true or false"),
        ({"backbone": {"out_indices": 7}}, "model.backbone.out_indices must be a list"),
        ({"backbone": "dinov2"}, "model.backbone must be a mapping"),
    ],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data, "model")


def test_null_rein_means_the_plain_backbone():
    assert from_dict(ModelConfig, {"rein": None}, "model").rein is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.tuning=lorra", "model.tuning='lorra' is not one of rein, "),
        ("model.test.protocols=[foo]", "model.test.protocols: unknown protocol"),
        ("data.val=[{name: cityscapes}]", r"data.val\[0\]: dataset entry .* lacks 'root'"),
    ],
)
def test_load_config_refuses_names_that_would_fail_later(tmp_path, override, message):
    """These were accepted and failed at build or evaluation time."""
    from reinseg.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])
