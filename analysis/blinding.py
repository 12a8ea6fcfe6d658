"""Blinding: keep the observed data of the signal regions out of every result until unblinding.

A region's ``Type`` (TRExFitter's region type) is ``Signal`` (the default) or ``Control``.
Before unblinding, an analysis looks only at control-region data and at expected results in the
signal regions, as ATLAS and CMS analyses do. The workflow (``unblind: false``, the default)
therefore writes its results from *blinded* inputs, made by the functions here before any
statistics runs, so the observed signal-region counts never reach a result file:

* :func:`blind_workspace`: the pyhf workspace with each signal region's observation replaced by
  its Asimov expectation ("mixed" data: real control-region data, Asimov signal-region data).
  The Asimov yields are the model's expectation at the POI's nominal value (the NormFactor's
  ``Nominal``, the hypothesis the analysis is built for) and the other parameters at the
  best fit of the **control regions alone** to their data (POI fixed at nominal when it acts
  there; parameters that do not appear in any control region at their nominal values;
  without control regions, pre-fit). Every fit, significance, limit, ranking and scan on this
  workspace is then an *expected* result informed by the control regions (the "realistic
  Asimov" of a blinded analysis): the maximum-likelihood fit returns the nominal POI in the
  signal regions and the control-region normalisations fitted to their data; the "observed"
  significance and limit of such a workspace equal the expected ones (up to the small
  difference between the profiled and the nominal nuisance parameters) and are never shown
  as observed.
* :func:`blind_histograms` and :func:`blind_cut_flows`: the data sample is removed from the
  signal regions of ``diffana histograms`` and ``diffana cutflow`` output (control regions
  keep theirs).

:func:`blinding_record` is what the workflow writes to ``results/<analysis>/blinding.json``;
the report reads it to know whether the results it shows were made blinded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "BLINDING_FILE",
    "blind_cut_flows",
    "blind_histograms",
    "blind_workspace",
    "blinding_record",
    "signal_regions",
]

BLINDING_FILE = "blinding.json"
"""Name of the blinding record in a workflow results folder."""

METHOD = (
    "signal-region data replaced by the Asimov expectation at the POI's nominal value, with "
    "the other parameters fitted to the control-region data alone"
)
"""How :func:`blind_workspace` blinds, in words (for the record and the report)."""


def signal_regions(config: Config) -> tuple[str, ...]:
    """Names of the regions of ``config`` whose ``Type`` is ``Signal``, in config order."""
    return tuple(region.name for region in config.regions if region.type == "Signal")


def blinding_record(config: Config, *, unblind: bool) -> dict[str, Any]:
    """``{"blinded", "signal_regions", "control_regions", "method"}`` of a workflow run."""
    signal = signal_regions(config)
    return {
        "blinded": not unblind and bool(signal),
        "signal_regions": list(signal),
        "control_regions": [r.name for r in config.regions if r.name not in signal],
        "method": None if unblind or not signal else METHOD,
    }


def blind_workspace(spec: Mapping[str, Any], regions: Collection[str]) -> dict[str, Any]:
    """A copy of the pyhf workspace ``spec`` whose observations of the channels ``regions``
    are the Asimov expectation described in the module docstring.

    The first measurement is used (its POI and parameter settings). The control-region fit is
    diffana's maximum-likelihood fit (:func:`analysis.fit.fit_model`, MIGRAD) of the workspace
    restricted to the other channels. Channels in ``regions`` that the workspace does not
    have are ignored; a workspace without any of them is returned unchanged (copied).
    """
    from analysis.fit import fit_model
    from analysis.likelihood import Workspace

    blinded = copy.deepcopy(dict(spec))
    names = [channel["name"] for channel in spec["channels"]]
    hidden = [name for name in names if name in set(regions)]
    if not hidden:
        return blinded
    workspace = Workspace.from_spec(spec, source="workspace to blind")
    measurement = workspace.measurement()
    poi = measurement["config"].get("poi") or ""
    model = workspace.model(measurement["name"], poi_name=poi)
    pars = model.suggested_init()
    control = _restricted(blinded, [name for name in names if name not in hidden])
    if control is not None:
        cr_workspace = Workspace.from_spec(control, source="control regions")
        cr_poi = poi if poi and _has_parameter(control, poi) else ""
        cr_model = cr_workspace.model(poi_name=cr_poi)
        fixed = cr_model.suggested_fixed()
        if cr_poi:
            fixed[cr_model.poi_index] = True  # the signal hypothesis: POI at its nominal value
        result = fit_model(cr_model, cr_workspace.data(cr_model), fixed=fixed)
        for name, cr_slice in cr_model.par_slices.items():
            full = model.par_slices.get(name)
            if full is not None and full.stop - full.start == cr_slice.stop - cr_slice.start:
                pars[full] = result.bestfit[cr_slice].to(pars)
    expected = model.expected_data(pars, include_auxdata=False)
    start, asimov = 0, {}
    for channel in model.channels:
        n = model.channel_nbins[channel]
        asimov[channel] = expected[start : start + n].tolist()
        start += n
    for observation in blinded["observations"]:
        if observation["name"] in hidden:
            observation["data"] = asimov[observation["name"]]
    log.info("blinded the data of %s (%s)", ", ".join(hidden), METHOD)
    return blinded


def blind_histograms(
    payload: Mapping[str, Any], regions: Collection[str], data_samples: Collection[str]
) -> dict[str, Any]:
    """``diffana histograms`` output (region -> sample -> variation -> histogram) without the
    ``data_samples`` in the ``regions``."""
    return {
        region: {
            sample: variations
            for sample, variations in samples.items()
            if not (region in regions and sample in data_samples)
        }
        for region, samples in payload.items()
    }


def blind_cut_flows(payload: Mapping[str, Any], regions: Collection[str]) -> dict[str, Any]:
    """``diffana cutflow`` output without the data sample in the cut flows of ``regions``
    (in every cut set: ``start`` and ``optimized``); everything else unchanged."""
    blinded = copy.deepcopy(dict(payload))
    for key, flows in blinded.items():
        if key in ("cuts", "mc_statistics") or not isinstance(flows, dict):
            continue
        for region, flow in flows.items():
            data = flow.get("data")
            if region in regions and data is not None:
                flows[region] = {
                    **flow,
                    "samples": [s for s in flow["samples"] if s != data],
                    "data": None,
                    **{
                        field: {s: v for s, v in flow[field].items() if s != data}
                        for field in ("events", "yields", "uncertainties")
                    },
                }
    return blinded


def _restricted(spec: Mapping[str, Any], channels: list[str]) -> dict[str, Any] | None:
    """``spec`` with only ``channels`` (and the measurement settings of the parameters they
    still have), or None when they have no parameter to fit."""
    kept = [c for c in spec["channels"] if c["name"] in channels]
    if not any(m for c in kept for s in c["samples"] for m in s["modifiers"]):
        return None
    present = {m["name"] for c in kept for s in c["samples"] for m in s["modifiers"]}
    measurements = []
    for measurement in spec["measurements"][:1]:
        config = dict(measurement["config"])
        config["parameters"] = [p for p in config.get("parameters", []) if p["name"] in present]
        if config.get("poi") not in present:
            config["poi"] = ""
        measurements.append({**measurement, "config": config})
    return {
        **spec,
        "channels": kept,
        "observations": [o for o in spec["observations"] if o["name"] in channels],
        "measurements": measurements,
    }


def _has_parameter(spec: Mapping[str, Any], name: str) -> bool:
    return any(
        m["name"] == name for c in spec["channels"] for s in c["samples"] for m in s["modifiers"]
    )
