"""HistFactory workspaces in pyhf JSON format, built from histograms with cabinetry's semantics.

The builder works on torch tensors, so the same code serves two purposes: with hard histograms
it writes the workspace of ``diffana workspace`` (:func:`build`, plain floats, validated by
pyhf's schema); with relaxed histograms that carry gradients, :func:`build_spec` returns the
same structure with tensor leaves, from which the differentiable likelihood is built.

Per region and prediction sample the modifiers are, in this order (as cabinetry 0.6 writes
them): ``staterror_<region>`` with data ``sqrt(sum w^2)`` per bin (unless DisableStaterror), the
NormFactors acting on the sample, then the Systematics in config order:

- ``Normalization``: ``normsys`` with ``hi = 1 + Up.Normalization``,
  ``lo = 1 + Down.Normalization``.
- ``NormPlusShape``: split into a normalisation and a shape part. With nominal n and a variation
  v, the ``normsys`` factor is ``k = sum(v) / sum(n)`` and the ``histosys`` template is ``v / k``,
  which has the nominal's total yield. A ``Symmetrize`` side is the mirror of the other side
  after normalising: template ``2 n - v/k`` and factor ``2 - k`` (cabinetry's "method 1": first
  normalise, then symmetrise). Single-bin regions get no ``histosys`` (a shape needs two bins).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyhf
import torch

from analysis.config import Config, Region, Sample, Systematic
from analysis.errors import DataError
from analysis.histograms import Histogram
from analysis.io import TemplateKey


def build_spec(config: Config, histograms: Mapping[TemplateKey, Histogram]) -> dict[str, Any]:
    """The pyhf workspace structure with torch tensors as numeric leaves (see module docstring)."""
    channels = []
    observations = []
    for region in config.regions:
        samples = []
        for sample in config.samples_in(region):
            nominal = histograms[(region.name, sample.name, "nominal")]
            modifiers: list[dict[str, Any]] = []
            if not sample.disable_staterror:
                modifiers.append(
                    {
                        "name": "staterror_" + region.name.replace(" ", "-"),
                        "type": "staterror",
                        "data": nominal.stdev,
                    }
                )
            for nf in config.norm_factors_for(region, sample):
                modifiers.append({"name": nf.name, "type": "normfactor", "data": None})
            for syst in config.systematics_for(region, sample):
                modifiers += _systematic_modifiers(region, sample, syst, nominal, histograms)
            samples.append({"name": sample.name, "data": nominal.yields, "modifiers": modifiers})
        channels.append({"name": region.name, "samples": samples})
        data = histograms[(region.name, config.data_sample.name, "nominal")]
        observations.append({"name": region.name, "data": data.yields})
    return {
        "channels": channels,
        "measurements": [{"name": config.general.measurement, "config": _measurement(config)}],
        "observations": observations,
        "version": "1.0.0",
    }


def build(config: Config, histograms: Mapping[TemplateKey, Histogram]) -> dict[str, Any]:
    """The pyhf JSON workspace (plain Python numbers), validated against pyhf's schema."""
    workspace = to_json(build_spec(config, histograms))
    pyhf.schema.validate(workspace, "workspace.json")
    return workspace


def to_json(spec: Any) -> Any:
    """Replace tensors in a nested spec by (lists of) Python floats, detached."""
    if isinstance(spec, torch.Tensor):
        return spec.detach().cpu().tolist()
    if isinstance(spec, dict):
        return {key: to_json(value) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [to_json(value) for value in spec]
    return spec


def _systematic_modifiers(
    region: Region,
    sample: Sample,
    syst: Systematic,
    nominal: Histogram,
    histograms: Mapping[TemplateKey, Histogram],
) -> list[dict[str, Any]]:
    name = syst.modifier_name
    if syst.type == "Normalization":
        return [
            {
                "name": name,
                "type": "normsys",
                "data": {"hi": 1 + syst.up.normalization, "lo": 1 + syst.down.normalization},
            }
        ]
    total = nominal.yields.sum()
    if not total > 0:
        raise DataError(
            f"systematic '{syst.name}': sample '{sample.name}' has a non-positive total yield "
            f"{float(total):.6g} in region '{region.name}'; cannot normalise its variations"
        )

    def normalised(side: str) -> tuple[torch.Tensor, torch.Tensor]:
        varied = histograms[(region.name, sample.name, f"{syst.name}_{side}")].yields
        factor = varied.sum() / total
        return varied / factor, factor

    if syst.down.symmetrize:
        hi_data, hi = normalised("Up")
        lo_data, lo = 2 * nominal.yields - hi_data, 2 - hi
    elif syst.up.symmetrize:
        lo_data, lo = normalised("Down")
        hi_data, hi = 2 * nominal.yields - lo_data, 2 - lo
    else:
        hi_data, hi = normalised("Up")
        lo_data, lo = normalised("Down")
    modifiers = [{"name": name, "type": "normsys", "data": {"hi": hi, "lo": lo}}]
    if nominal.yields.shape[0] > 1:
        modifiers.append(
            {"name": name, "type": "histosys", "data": {"hi_data": hi_data, "lo_data": lo_data}}
        )
    return modifiers


def _measurement(config: Config) -> dict[str, Any]:
    """POI and parameter settings: NormFactor inits/bounds, fixed parameters (as cabinetry)."""
    fixed = config.general.fixed
    parameters = []
    for nf in config.norm_factors:
        parameter: dict[str, Any] = {"name": nf.name}
        init = nf.nominal if nf.nominal is not None else fixed.get(nf.name)
        if init is not None:
            parameter["inits"] = [init]
        if nf.bounds is not None:
            parameter["bounds"] = [list(nf.bounds)]
        if nf.name in fixed:
            parameter["fixed"] = True
        parameters.append(parameter)
    for syst in config.systematics:
        if syst.name in fixed:
            parameters.append({"name": syst.name, "inits": [fixed[syst.name]], "fixed": True})
    return {"parameters": parameters, "poi": config.general.poi or ""}
