"""Shared fixtures: small real ROOT files written with uproot in temporary folders."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
DEMO_EVENTS = 20000


@pytest.fixture(scope="session")
def demo_setup(tmp_path_factory):
    """The demo analysis (models/dimuon.yaml) on DEMO_EVENTS generated events: (config, events).

    Shared by the whole session: do not modify the events.
    """
    from analysis import config as config_module
    from analysis import generate
    from analysis.io import read_events

    folder = tmp_path_factory.mktemp("demo")
    generate.generate(folder / "data" / "generated", events=DEMO_EVENTS)
    raw = yaml.safe_load((MODELS / "dimuon.yaml").read_text())
    raw["General"]["InputPath"] = str(folder / "data" / "generated" / "{SamplePath}")
    config = config_module.from_dict(raw, source="dimuon.yaml")
    return config, read_events(config, cache_dir=folder / "cache")


def reference_path(*parts: str) -> pathlib.Path:
    """A file under ../shared/reference, or skip when that folder is absent (a user's clone)."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found at {path}")
    return path


def write_tree(path: pathlib.Path, name: str, columns: dict[str, np.ndarray | ak.Array]) -> None:
    """Write (or add to ``path``) a TTree with uproot's mktree; jagged muons as Muon_*."""
    mode = uproot.update if path.exists() else uproot.recreate
    with mode(path) as file:
        types = {
            k: (v.type if isinstance(v, ak.Array) and k == "Muon" else np.asarray(v).dtype)
            for k, v in columns.items()
        }
        tree = file.mktree(name, types)
        tree.extend(columns)


@dataclass
class ToyAnalysis:
    """Folder, raw columns per tree and a config dict for a two-sample toy analysis."""

    folder: pathlib.Path
    columns: dict[str, dict[str, np.ndarray]]
    config: dict

    def write_config(self, config: dict | None = None, name: str = "toy.yaml") -> pathlib.Path:
        path = self.folder / name
        path.write_text(yaml.safe_dump(config if config is not None else self.config))
        return path


def _toy_columns(rng: np.random.Generator, n: int, shift: float, weighted: bool) -> dict:
    n_muon = rng.integers(1, 4, size=n)
    pt = rng.exponential(20.0, size=int(n_muon.sum())) + 5.0
    muon = ak.zip(
        {"pt": ak.unflatten(pt, n_muon), "eta": ak.unflatten(rng.normal(0, 1.5, pt.size), n_muon)}
    )
    columns = {"x": rng.normal(shift, 1.0, n), "met": rng.exponential(30.0, n), "Muon": muon}
    if weighted:
        weight = rng.uniform(0.5, 1.5, n) * np.where(rng.uniform(size=n) < 0.1, -1.0, 1.0)
        columns |= {"weight": weight, "weight_up": weight * 1.1}
    return columns


@pytest.fixture
def toy(tmp_path: pathlib.Path) -> ToyAnalysis:
    rng = np.random.default_rng(7)
    trees = {
        ("mc.root", "sig"): _toy_columns(rng, 3000, 1.0, True),
        ("mc.root", "bkg"): _toy_columns(rng, 5000, -0.5, True),
        ("mc.root", "bkg_up"): _toy_columns(rng, 5000, -0.3, True),
        ("data.root", "data"): _toy_columns(rng, 4000, -0.2, False),
    }
    for (file, tree), columns in trees.items():
        write_tree(tmp_path / file, tree, columns)
    config = {
        "General": {"Measurement": "toy", "POI": "mu", "InputPath": str(tmp_path / "{SamplePath}")},
        "Definitions": [
            {"Name": "lead_pt", "Expression": "Muon_pt[:, 0]"},
            {"Name": "n_central", "Expression": "ak.sum(abs(Muon_eta) < 1.5, axis=1)"},
        ],
        "Regions": [
            {
                "Name": "SR",
                "Variable": "x",
                "Binning": [-3.0, -1.5, -0.5, 0.0, 0.5, 1.5, 3.0],
                "Filter": "n_central >= 1",
                "Cuts": [
                    {"Variable": "lead_pt", "Direction": ">", "Value": 15.0, "Bounds": [5.0, 60.0]},
                    {"Variable": "met", "Direction": "<", "Value": 60.0, "Bounds": [10.0, 200.0]},
                ],
            }
        ],
        "Samples": [
            {"Name": "Data", "Tree": "data", "SamplePath": "data.root", "Data": True},
            {"Name": "Signal", "Tree": "sig", "SamplePath": "mc.root", "Weight": "weight"},
            {"Name": "Background", "Tree": "bkg", "SamplePath": "mc.root", "Weight": "weight"},
        ],
        "Systematics": [
            {
                "Name": "Lumi",
                "Type": "Normalization",
                "Up": {"Normalization": 0.02},
                "Down": {"Normalization": -0.02},
            },
            {
                "Name": "Modeling",
                "Type": "NormPlusShape",
                "Samples": "Background",
                "Up": {"Tree": "bkg_up"},
                "Down": {"Symmetrize": True},
            },
            {
                "Name": "WeightSys",
                "Type": "NormPlusShape",
                "Samples": ["Background", "Signal"],
                "Up": {"Weight": "weight_up"},
                "Down": {"Weight": "0.95*weight"},
            },
        ],
        "NormFactors": [{"Name": "mu", "Samples": "Signal", "Nominal": 1, "Bounds": [0, 10]}],
    }
    raw = {f"{file}:{tree}": columns for (file, tree), columns in trees.items()}
    return ToyAnalysis(folder=tmp_path, columns=raw, config=config)


@pytest.fixture(scope="module")
def dask_scheduler():
    """The TCP address of a ``distributed.LocalCluster`` of 2 single-threaded workers in this
    process (threads: no worker start-up and imports), for ``--dask ADDRESS``; one per module."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
    ) as cluster:
        yield cluster.scheduler_address
