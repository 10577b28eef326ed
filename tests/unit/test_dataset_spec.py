import pytest

from contracts.dataset_spec import SpecError, list_specs, load_spec, parse_spec
from contracts.settings import PROJECT_ROOT


def test_shipped_specs_load():
    names = {s.name for s in list_specs()}
    assert {"leukemia", "pbc8"} <= names and "_template" not in names
    leuk = load_spec("leukemia")
    assert leuk.labels == ["abnormal", "normal"] and leuk.positive_label == "abnormal"
    assert leuk.label_of("Benign") == "normal" and leuk.label_of("Pro") == "abnormal"
    pbc = load_spec("pbc8")
    assert len(pbc.labels) == 8 and pbc.labels == sorted(pbc.class_folders)


def test_template_is_a_valid_spec():
    spec = parse_spec((PROJECT_ROOT / "pipeline/specs/_template.toml").read_text())
    assert spec.name == "wbc4" and len(spec.labels) == 4


def test_class_of_key():
    leuk = load_spec("leukemia")
    assert leuk.class_of_key("raw/leukemia/Pre/a.jpg") == "Pre"
    assert leuk.class_of_key("raw/leukemia/stray.jpg") is None
    assert leuk.class_of_key("raw/other/Pre/a.jpg") is None


@pytest.mark.parametrize(
    "text,match",
    [
        ("name = 'X'\n[classes]\na='x'\nb='y'", "lower-case"),
        ("name = 'x'\n[classes]\na='x'", "at least two"),
        ("name = 'x'\n[classes]\na='x'\nb='x'", "one label"),
        ("name = 'x'\npositive_label='z'\n[classes]\na='x'\nb='y'", "positive_label"),
        ("name = 'x'\ns3_prefix='/abs/'\n[classes]\na='x'\nb='y'", "s3_prefix"),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_specs_are_rejected_clearly(text, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(SpecError, match="known: .*leukemia"):
        load_spec("nope")


def test_crop_policy_option():
    base = 'name = "x"\n[classes]\na = "a"\nb = "b"\n'
    assert parse_spec(base).crop == "center_crop"
    assert parse_spec('crop = "fit"\n' + base).crop == "fit"
    with pytest.raises(SpecError, match="crop must be one of"):
        parse_spec('crop = "stretch"\n' + base)


def test_inference_tta_option():
    """On unless the spec says false; anything but a TOML boolean is refused (a quoted "false" would be true)."""
    from contracts.dataset_spec import inference_tta_default
    from contracts.settings import get_settings

    base = 'name = "x"\n[classes]\na = "a"\nb = "b"\n'
    assert parse_spec(base).inference_tta is True
    assert parse_spec("inference_tta = false\n" + base).inference_tta is False
    with pytest.raises(SpecError, match="inference_tta must be true or false"):
        parse_spec('inference_tta = "false"\n' + base)
    assert parse_spec((PROJECT_ROOT / "pipeline/specs/_template.toml").read_text()).inference_tta is True
    assert inference_tta_default(get_settings(), "no-such-dataset") is True


def test_crop_policy_is_recorded_in_the_dataset_version_params():
    from contracts.imaging import crop_of
    from pipeline.preprocess import preprocessing_params
    from contracts.settings import get_settings

    s = get_settings()
    default, fit = preprocessing_params(s), preprocessing_params(s, "fit")
    assert default["policy"] == "resize_shorter_center_crop"  # unchanged: old versions keep their hash
    assert crop_of(default) == "center_crop" and crop_of(fit) == "fit" and default != fit


def test_training_table_overrides_the_global_settings_for_its_dataset_only(tmp_path):
    from contracts.dataset_spec import training_settings
    from contracts.settings import Settings

    base = 'name = "{name}"\n{training}[classes]\na = "a"\nb = "b"\n'
    (tmp_path / "big.toml").write_text(
        base.format(name="big", training="[training]\ntrain_input_size = 128\nmodel_width = 24\nepochs = 20\n"
                                              "threshold_rule = \"conformal\"\n"))
    (tmp_path / "plain.toml").write_text(base.format(name="plain", training=""))
    settings = Settings(_env_file=None, dataset_specs_dir=tmp_path, train_input_size=96, epochs=14)
    big = training_settings(settings, "big")
    assert (big.train_input_size, big.model_width, big.epochs, big.threshold_rule) == (128, 24, 20, "conformal")
    assert settings.threshold_rule == "validation"
    assert training_settings(settings, "plain") is settings and training_settings(settings, "gone") is settings
    stained = {"model_stain_normalisation": "per_image"}  # chosen on 3-fold for both built-in sets
    assert load_spec("pbc8").training == stained
    assert load_spec("leukemia").training == {**stained, "train_input_size": 128, "target_sensitivity": 0.99,
                                              "model_ensemble_size": 2, "threshold_rule": "quantile"}
    shipped = Settings(_env_file=None)
    assert shipped.model_stain_normalisation == "none"  # the global default is unchanged
    leukemia = training_settings(shipped, "leukemia")
    assert (leukemia.model_stain_normalisation, leukemia.train_input_size, leukemia.target_sensitivity,
            leukemia.model_ensemble_size, leukemia.threshold_rule) == ("per_image", 128, 0.99, 2, "quantile")


def test_template_copies_get_the_stain_normalisation():
    spec = parse_spec((PROJECT_ROOT / "pipeline/specs/_template.toml").read_text())
    assert spec.training == {"model_stain_normalisation": "per_image"}


@pytest.mark.parametrize(("table", "match"), [
    ("train_input_size = 8", "train_input_size"),
    ("model_width = 2", "model_width"),
    ("learning_rate = 0.1", "learning_rate"),
    ("epochs = 'many'", "epochs"),
    ("model_stain_normalisation = 'macenko'", "model_stain_normalisation"),
    ("threshold_rule = 'median'", "threshold_rule"),
])
def test_bad_training_table_is_rejected_clearly(table, match):
    with pytest.raises(SpecError, match=rf"bad \[training\] table \({match}"):
        parse_spec(f'name = "x"\n[training]\n{table}\n[classes]\na = "a"\nb = "b"\n')
