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
  The mirrored template is not floored: where the normalised variation is more than twice the
  nominal (``v_b/k > 2 n_b``, e.g. a bin that the nominal leaves empty and a momentum-scale
  shift fills), it is negative, exactly as cabinetry writes it
  (``workspace._symmetrized_templates_and_norm``: ``2 * reference.yields - variation.yields``,
  no post-processing of it) and as pyhf uses it (``pyhf.Model`` clips no sample or bin by
  default). Only the sample's template is negative there; the yield floor below concerns the
  nominal background of a bin, and its pad is added to the mirrored template like to every
  other one.

**Yield floor.** HistFactory needs a positive expected yield in every bin (``log lambda``), also
at ``mu = 0``. Cuts, negative weights (and, in the relaxed pipeline, KDE smearing) can leave a
bin with no background prediction at all, or a negative one. The floor acts on such a bin only:
where the bin's total *background* ``B_b = sum_s n_sb`` over the samples the POI does not scale
(:func:`analysis.mc_statistics.background_samples`; all samples when there is none), the
prediction at ``mu = 0``, is below ``f = YieldFloor * sum_s sum_b |n_sb|`` (the region's total
over all samples, ``General.YieldFloor``, default :data:`FLOOR_FRACTION` = 1e-6, detached), the
pad ``p_b = smooth_floor(B_b, f) - B_b`` (:func:`smooth_floor`: ``B_b`` then lies between
``f/2`` and ``f``) is added in equal shares to the bin of every template (nominal and
variations) of those background samples, after the NormPlusShape split, so that every
``histosys`` shift is unchanged. Each share ``p`` comes with its own MC-statistical uncertainty:
``p^2`` is added to the sample's sum of w^2, a 100% uncertainty on what was added. So a bin
with signal but no background simulation is not background-free (and the likelihood at
``mu = 0`` stays finite); the guard of :mod:`analysis.mc_statistics` keeps the optimizer away
from such bins. Every other bin is untouched (``p_b`` is exactly 0 there), so an analysis whose
background populates every bin gives cabinetry's workspace number for number. Data are never
floored. ``YieldFloor: 0`` switches it off.

A sample whose nominal total in a region is ``<= 0`` (all its events cut away) cannot be split
into a normalisation and a shape part (``k = sum(v) / sum(n)``); neither can a systematic one of
whose (not symmetrized) variations has a total ``<= 0`` (``k <= 0``: no shape ``v / k``, and a
``normsys`` factor must be positive). Such ``NormPlusShape`` systematics keep their two
modifiers with ``normsys`` ``hi = lo = 1`` and the unnormalised variations as the ``histosys``
templates, so the prediction at ``alpha = +-1`` is still the variation. (cabinetry divides by
``k`` regardless and writes NaN.)

The same functions build the relaxed pipeline's model, so at ``tau = 0``, ``bandwidth = 0`` it
is this workspace exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pyhf
import torch

from analysis import mc_statistics
from analysis.config import Config, Region, Sample, Systematic
from analysis.errors import DataError
from analysis.histograms import Histogram
from analysis.io import TemplateKey

FLOOR_FRACTION = 1e-6
"""Default ``General.YieldFloor``: the floor of a bin's total prediction as a fraction of the
region's total nominal prediction ``sum_s sum_b |n_sb|`` (module docstring, "Yield floor")."""


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


def region_floor(
    config: Config, region: Region, histograms: Mapping[TemplateKey, Histogram]
) -> torch.Tensor:
    """The yield floor of a region (module docstring, "Yield floor"): ``YieldFloor`` times the
    region's total nominal prediction ``sum_s sum_b |n_sb|``, detached. Raises DataError when the
    region has no prediction left (nothing to scale a floor by)."""
    nominals = [histograms[(region.name, s.name, "nominal")] for s in config.samples_in(region)]
    # sum() gives 0 (an int) only without nominals, which raises below
    total = cast(torch.Tensor, sum(h.yields.detach().abs().sum() for h in nominals))
    if not total > 0:
        raise DataError(
            f"region '{region.name}': no predicted events left (total yield of the samples "
            f"{', '.join(s.name for s in config.samples_in(region))} is 0); loosen the cuts"
        )
    return config.general.yield_floor * total


def floor_pads(
    config: Config, histograms: Mapping[TemplateKey, Histogram]
) -> dict[tuple[str, str], torch.Tensor]:
    """``(region, sample) -> p`` per bin: what the yield floor adds to every template of that
    sample, with ``p^2`` added to its sum of w^2 (module docstring, "Yield floor"). Only samples
    that receive a pad somewhere are listed; ``p`` is exactly 0 in every bin whose background
    prediction is at or above the floor."""
    out = {}
    for region in config.regions:
        receivers = mc_statistics.background_samples(config, region) or config.samples_in(region)
        total = cast(
            torch.Tensor,
            sum(histograms[(region.name, s.name, "nominal")].yields for s in receivers),
        )
        floor = region_floor(config, region, histograms)
        if bool((total.detach() >= floor).all()):
            continue
        share = (smooth_floor(total, floor) - total) / len(receivers)
        for sample in receivers:
            out[(region.name, sample.name)] = share
    return out


def build_spec(config: Config, histograms: Mapping[TemplateKey, Histogram]) -> dict[str, Any]:
    """The pyhf workspace structure with torch tensors as numeric leaves (see module docstring).

    Bins without background prediction are floored (module docstring, "Yield floor"); data
    are not.
    """
    pads = floor_pads(config, histograms) if config.general.yield_floor > 0 else {}
    channels = []
    observations = []
    for region in config.regions:
        samples = []
        for sample in config.samples_in(region):
            raw = histograms[(region.name, sample.name, "nominal")]
            pad = pads.get((region.name, sample.name))
            nominal = raw if pad is None else _padded(raw, pad)
            modifiers: list[dict[str, Any]] = []
            if not sample.disable_staterror:
                modifiers.append(
                    {
                        "name": "staterror_" + region.name.replace(" ", "-"),
                        "type": "staterror",
                        "data": _stdev(nominal.variances),
                    }
                )
            for nf in config.norm_factors_for(region, sample):
                modifiers.append({"name": nf.name, "type": "normfactor", "data": None})
            for syst in config.systematics_for(region, sample):
                modifiers += _systematic_modifiers(region, sample, syst, raw, histograms, pad)
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


def _stdev(sumw2: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum w^2)``, with gradient 0 (not NaN) where ``sum w^2 = 0`` (a bin without events
    of this template: its staterror contribution is then 0, as pyhf's)."""
    positive = sumw2 > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sumw2, 1.0)), 0.0)


def _padded(hist: Histogram, pad: torch.Tensor) -> Histogram:
    """``hist`` with ``pad`` added to its yields and ``pad^2`` to its sum of w^2."""
    return Histogram(hist.edges, hist.yields + pad, hist.variances + pad * pad)


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
    pad: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """The modifiers of one systematic on one sample (module docstring), from the unfloored
    ``nominal`` and variations; the floor's ``pad`` (if any) is added to the histosys
    templates, as to the nominal, after the split."""
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

    def variation(side: str) -> torch.Tensor:
        return histograms[(region.name, sample.name, f"{syst.name}_{side}")].yields

    # module docstring: without a positive nominal and variation total, no norm/shape split
    given = [side for side, over in (("Up", syst.up), ("Down", syst.down)) if not over.symmetrize]
    splittable = bool(total > 0) and all(bool(variation(side).sum() > 0) for side in given)

    def normalised(side: str) -> tuple[torch.Tensor, torch.Tensor]:
        varied = variation(side)
        if not splittable:
            return varied, torch.ones_like(total)
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
    if pad is not None:
        hi_data, lo_data = hi_data + pad, lo_data + pad
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
