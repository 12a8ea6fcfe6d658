"""Configuration: cabinetry's example validates; every rule gives a one-line message."""

from __future__ import annotations

import copy

import pytest

from analysis import config as configuration
from analysis.errors import ConfigError
from tests.conftest import reference_path


def test_cabinetry_example_validates_unchanged():
    cfg = configuration.load(reference_path("cabinetry", "config_example.yml"))
    assert [s.name for s in cfg.samples] == ["Data", "Signal", "Background"]
    assert cfg.data_sample.name == "Data"
    assert cfg.general.poi == "Signal_norm"
    assert cfg.regions[0].binning == (200.0, 300.0, 400.0, 500.0, 600.0)
    variations = [(t.sample.name, t.variation, t.tree, t.weight) for t in cfg.templates()]
    assert variations == [
        ("Data", "nominal", "pseudodata", None),
        ("Signal", "nominal", "signal", "weight"),
        ("Background", "nominal", "background", "weight"),
        ("Background", "Modeling_Up", "background_varied", "weight"),
        ("Background", "WeightBasedModeling_Up", "background", "weight_up"),
        ("Background", "WeightBasedModeling_Down", "background", "0.7*weight"),
    ]


def test_defaults_and_cut_names(toy):
    cfg = configuration.from_dict(toy.config)
    assert [c.name for c in cfg.cuts] == ["SR:lead_pt>", "SR:met<"]
    assert cfg.cut_values() == {"SR:lead_pt>": 15.0, "SR:met<": 60.0}
    assert cfg.optimization.objective == "discovery_significance"
    moved = cfg.with_cut_values({"SR:met<": 80.0})
    assert moved.cut_values()["SR:met<"] == 80.0 and cfg.cut_values()["SR:met<"] == 60.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["Regions"][0].update(Binnig=c["Regions"][0].pop("Binning")),
            "Regions[0]: unknown key 'Binnig' (did you mean 'Binning'?)",
        ),
        (
            lambda c: c["Regions"][0].update(Binning=[0, 1, 1, 2]),
            "Regions[0].Binning: bin edges must be finite and strictly increasing",
        ),
        (
            lambda c: c["Samples"][1].update(Data=True),
            "Samples: expected exactly one sample with Data: true, found 2",
        ),
        (
            lambda c: c["Samples"].append(copy.deepcopy(c["Samples"][1])),
            "Samples[3].Name: 'Signal' is used twice",
        ),
        (lambda c: c["General"].update(POI="mu_sig"), "General.POI: 'mu_sig' is not a NormFactor"),
        (
            lambda c: c["Systematics"][1].update(Samples="Backgrund"),
            "Systematics[1].Samples: unknown name 'Backgrund' (did you mean 'Background'?)",
        ),
        (
            lambda c: c["Systematics"][0].update(Type="Norm"),
            "Systematics[0].Type: 'Norm' is not one of 'Normalization', 'NormPlusShape'",
        ),
        (
            lambda c: c["Regions"][0]["Cuts"][0].update(Value=100.0),
            "Regions[0].Cuts[0]: Value 100.0 must lie within Bounds [5.0, 60.0]",
        ),
        (
            lambda c: c["Regions"][0]["Cuts"][0].pop("Bounds"),
            "Regions[0].Cuts[0]: a trainable cut needs Bounds",
        ),
        (
            lambda c: c["Regions"][0]["Cuts"][0].update(Direction=">="),
            "Regions[0].Cuts[0].Direction: '>=' is not one of '>', '<'",
        ),
        (
            lambda c: c["Definitions"].append({"Name": "np", "Expression": "x"}),
            "Definitions[2].Name: 'np' is reserved",
        ),
        (
            lambda c: c["Systematics"][1]["Up"].update(Symmetrize=True),
            "Systematics[1]: Up and Down cannot both be symmetrized",
        ),
    ],
)
def test_invalid_configs_name_the_problem(toy, change, message):
    raw = copy.deepcopy(toy.config)
    change(raw)
    with pytest.raises(ConfigError) as info:
        configuration.from_dict(raw, source="toy.yaml")
    text = str(info.value)
    assert text.startswith("toy.yaml: ") and message in text and "\n" not in text


def test_cuts_file_is_checked(toy, tmp_path):
    cfg = configuration.from_dict(toy.config)
    path = tmp_path / "cuts.json"
    path.write_text('{"SR:lead_pt>": 20.0}')
    assert configuration.load_cuts(path, cfg).cut_values()["SR:lead_pt>"] == 20.0
    path.write_text('{"SR:lead_pt": 20.0}')
    with pytest.raises(
        ConfigError, match="unknown cut 'SR:lead_pt' \\(did you mean 'SR:lead_pt>'\\?\\)"
    ):
        configuration.load_cuts(path, cfg)
    path.write_text('{"SR:lead_pt>": 99.0}')
    with pytest.raises(ConfigError, match="outside its Bounds"):
        configuration.load_cuts(path, cfg)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("General:\n  Measurement: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        configuration.load(path)


def test_schema_has_a_description_on_every_field():
    schema = configuration._schema()

    def walk(node, path):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{path}.{key} has no description"
            for key, sub in node.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{path}[{i}]")

    walk(schema, "schema")
