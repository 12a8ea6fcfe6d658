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

**Yield floor.** HistFactory needs a positive expected yield in every bin (``log lambda``) and a
positive staterror width; cuts, negative weights (and, in the relaxed pipeline, KDE smearing)
can leave a bin, or a whole sample, empty or negative. Every prediction template (nominal and
variations) of a region is therefore passed through :func:`smooth_floor` per bin at
``f = YieldFloor * sum_s sum_b |n_sb|``, the region's total nominal prediction
(``General.YieldFloor``, default :data:`FLOOR_FRACTION` = 1e-6), and its sum of squared weights
at ``YieldFloor * sum_s sum_b s_sb`` likewise. One floor per region, not per template: a
template that went entirely empty (a background removed by the cuts, while a variation of it
kept a few events) then stays on the scale of the region, so its normalisation factors and
interpolated templates stay finite. Bins above the floor are unchanged, so a valid analysis gets
exactly its histograms (like TRExFitter's correction of empty and negative bins, but
continuous). Data are never floored. ``YieldFloor: 0`` switches this off, as cabinetry has no
floor: cabinetry's example then gives cabinetry's workspace number for number (its empty signal
bin stays 0). The same function builds the relaxed pipeline's model, so at ``tau = 0``,
``bandwidth = 0`` it is this workspace exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pyhf
import torch

from analysis.config import Config, Region, Sample, Systematic
from analysis.errors import DataError
from analysis.histograms import Histogram
from analysis.io import TemplateKey

FLOOR_FRACTION = 1e-6
"""Default ``General.YieldFloor``: the yield floor per bin as a fraction of the region's total
nominal prediction ``sum_s sum_b |n_sb|`` (and of ``sum_s sum_b s_sb`` for the sum of squared
weights); see :func:`smooth_floor`."""


def smooth_floor(x: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    r"""``x`` above ``floor``, smoothly bounded below by ``floor / 2`` under it.

    Math: ``g(x) = x`` for ``x >= f``, ``g(x) = (f / 2) (1 + exp(2 (x - f) / f))`` for ``x < f``
    (``f > 0``). ``g`` and ``g'`` are continuous at ``f`` (``g = f``, ``g' = 1``), ``g`` is
    increasing with ``f/2 < g(x) <= f`` below the floor and ``g(x) -> f/2`` for ``x -> -inf``.

    Why smooth: a hard ``clamp`` would do for a fixed workspace, but its gradient is exactly 0
    below the floor, so in the relaxed pipeline a bin that went empty could never be refilled
    by the optimizer; here the gradient ``exp(2 (x - f) / f)`` decays smoothly (to
    ``e^-2 = 0.14`` at ``x = 0``) and stays > 0. Above the floor value and gradient are
    untouched, so the hard limit is exact there.

    Numerics: the exponential is evaluated at ``min(x, f)`` (argument ``<= 0``), so the unused
    branch can neither overflow nor leak NaN into the gradient.
    """
    floor = torch.as_tensor(floor, dtype=x.dtype, device=x.device)
    below = torch.minimum(x, floor)
    soft = 0.5 * floor * (1.0 + torch.exp(2.0 * (below - floor) / floor))
    return torch.where(x >= floor, x, soft)


def floored(hist: Histogram, floor_n: torch.Tensor, floor_s: torch.Tensor) -> Histogram:
    """``hist`` with :func:`smooth_floor` applied to its yields at ``floor_n`` and to its sum of
    w^2 at ``floor_s``."""
    return Histogram(
        edges=hist.edges,
        yields=smooth_floor(hist.yields, floor_n),
        sumw2=smooth_floor(hist.sumw2, floor_s),
    )


def region_floors(
    config: Config, region: Region, histograms: Mapping[TemplateKey, Histogram]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The yield floor and the sum-of-w^2 floor of a region (module docstring, "Yield floor"):
    ``YieldFloor`` times the totals of the region's nominal prediction templates, detached.
    Raises DataError when the region has no prediction left (nothing to scale a floor by)."""
    nominals = [histograms[(region.name, s.name, "nominal")] for s in config.samples_in(region)]
    # sum() gives 0 (an int) only without nominals, which raises below
    total_n = cast(torch.Tensor, sum(h.yields.detach().abs().sum() for h in nominals))
    total_s = cast(torch.Tensor, sum(h.sumw2.detach().abs().sum() for h in nominals))
    if not total_n > 0:
        raise DataError(
            f"region '{region.name}': no predicted events left (total yield of the samples "
            f"{', '.join(s.name for s in config.samples_in(region))} is 0); loosen the cuts"
        )
    fraction = config.general.yield_floor
    tiny = torch.finfo(total_n.dtype).tiny
    return fraction * total_n, torch.clamp(fraction * total_s, min=tiny)


def build_spec(config: Config, histograms: Mapping[TemplateKey, Histogram]) -> dict[str, Any]:
    """The pyhf workspace structure with torch tensors as numeric leaves (see module docstring).

    Prediction templates are floored (module docstring, "Yield floor"); data are not.
    """
    if config.general.yield_floor > 0:
        floors = {r.name: region_floors(config, r, histograms) for r in config.regions}
        data_name = config.data_sample.name
        histograms = {
            key: hist if key[1] == data_name else floored(hist, *floors[key[0]])
            for key, hist in histograms.items()
        }
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
        # the config loader requires both Normalization values for this type
        return [
            {
                "name": name,
                "type": "normsys",
                "data": {
                    "hi": 1 + cast(float, syst.up.normalization),
                    "lo": 1 + cast(float, syst.down.normalization),
                },
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
