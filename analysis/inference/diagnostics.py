"""Checks around a fit that say what is wrong in words, and the global fit the ``diffana``
statistics commands report.

- :func:`check_start`: why twice the NLL is not finite at a start point (a bad data count, a
  bin whose expected yield is negative, not finite or 0 under observed events, and which fixed
  value, normsys factor, nominal yield or modifier causes it), as a
  :class:`~analysis.fit.FitError` or :class:`~analysis.errors.DataError` naming the channel and
  bin. Run it before a fit: a fit from a non-finite start only says that it failed.
- :func:`global_fit`: MIGRAD + HESSE (cabinetry's and pyhf's numbers) checked against the
  batched Newton minimum of :mod:`analysis.inference.mle`, which starts on both sides of kinked
  parameters: where Newton finds a lower minimum, MIGRAD stopped in a local one and is run again
  from Newton's point.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from analysis.errors import DataError
from analysis.fit import FitError, fit_model
from analysis.inference.mle import free_fit

log = logging.getLogger(__name__)

#: twice-NLL difference above which a Newton minimum counts as a different (lower) minimum
#: than MIGRAD's, not as MIGRAD's tolerance (its EDM goal is 2e-5 at cabinetry's settings)
DIFFERENT_MINIMUM = 1e-3


def check_start(
    workspace: Any,
    model: Any,
    data: torch.Tensor,
    init: torch.Tensor,
    *,
    asimov: bool = False,
    fixed_values: dict[str, float] | None = None,
    fixed_by: str = "--fix",
) -> None:
    """Nothing when twice_nll is finite at ``init``; else FitError (DataError for bad data)
    saying why.

    Names the first bin with a non-finite or negative count, or with an expected yield that is
    not finite, negative, or 0 where events are observed (with each sample's share), and what
    causes it: the ``fixed_values`` (parameter or parameter-set name -> value, set by what
    ``fixed_by`` names, e.g. the option ``--fix``) that make it finite when put back to their
    suggested values, a normsys with a factor <= 0, a negative nominal yield, or else the
    modifiers of the offending samples.

    Args:
        workspace: the :class:`~analysis.likelihood.Workspace` of ``model``: its ``source``
            starts every message, its ``spec`` is searched for the causes.
        model: the workspace's model.
        data: main data and auxdata, as ``model.twice_nll`` takes them.
        init: the start point (P,).
        asimov: ``data`` are the model's own expectation (not checked as observed counts).
    """
    value = float(model.twice_nll(init, data))
    if math.isfinite(value):
        return
    source, fixed_values = workspace.source, fixed_values or {}
    where = [(c, b) for c in model.channels for b in range(model.channel_nbins[c])]
    main = data[: model.nmain]
    bad_data = ~torch.isfinite(main) | (main < 0)
    if not asimov and bool(bad_data.any()):  # Asimov data are the model's: see below
        k = int(torch.nonzero(bad_data)[0])
        channel, b = where[k]
        raise DataError(
            f"{source}: observed data of channel '{channel}' bin {b} is {float(main[k]):g}; "
            "counts must be finite and >= 0"
        )
    lam = model.expected_actualdata(init)
    bad = ~torch.isfinite(lam) | (lam < 0) | ((lam == 0) & (main > 0))
    if not bool(bad.any()):
        detail, samples = "the constraint terms are not finite", []
        channel, b = "", 0
    else:
        k = int(torch.nonzero(bad)[0])
        channel, b = where[k]
        shares = model.expected_by_sample(init)[..., k]
        samples = [
            s
            for s, y in zip(model.samples, shares.tolist(), strict=True)
            if not math.isfinite(y) or y < 0
        ]
        parts = ", ".join(
            f"{s} {y:.6g}" for s, y in zip(model.samples, shares.tolist(), strict=True) if y != 0
        )
        detail = f"channel '{channel}' bin {b} expects {float(lam[k]):.6g} events ({parts})"
    causes = []
    for name, number in fixed_values.items():
        trial = init.clone()
        index = model.par_slices[name] if name in model.par_slices else model.par_names.index(name)
        trial[index] = model.suggested_init()[index]
        if math.isfinite(float(model.twice_nll(trial, data))):
            causes.append(f"{name}={number:g} (from {fixed_by})")
    if not causes:
        causes = _suspect_modifiers(workspace.spec, channel, b, samples)
    blame = f"; caused by {', '.join(causes)}" if causes else ""
    raise FitError(f"{source}: twice_nll is {value} at the start point: {detail}{blame}")


def _suspect_modifiers(spec: dict, channel: str, bin_index: int, samples: list[str]) -> list[str]:
    """What in the spec makes ``samples`` non-finite or negative in ``channel`` bin
    ``bin_index``: a normsys factor <= 0 (anywhere), a negative nominal yield, or else the
    samples' modifiers."""
    nonpositive, negative, listed = [], [], []
    for ch in spec["channels"]:
        for sample in ch["samples"]:
            mine = ch["name"] == channel and sample["name"] in samples
            if mine and float(sample["data"][bin_index]) < 0:
                negative.append(
                    f"the nominal yield {float(sample['data'][bin_index]):g} of sample "
                    f"'{sample['name']}'"
                )
            for mod in sample["modifiers"]:
                if mod["type"] == "normsys":
                    lo, hi = float(mod["data"]["lo"]), float(mod["data"]["hi"])
                    if min(lo, hi) <= 0:
                        nonpositive.append(
                            f"normsys '{mod['name']}' of sample '{sample['name']}' in channel "
                            f"'{ch['name']}' (hi {hi:g}, lo {lo:g}; factors must be > 0)"
                        )
                if mine:
                    listed.append(f"{mod['name']} ({mod['type']})")
    if nonpositive or negative:
        return nonpositive + negative
    return [f"one of the modifiers {', '.join(listed)}"] if listed else []


def global_fit(
    model: Any,
    data: torch.Tensor,
    init: torch.Tensor,
    fixed: torch.Tensor,
    minos: tuple[str, ...],
    method: Literal["newton", "minuit"] = "newton",
) -> Any:
    """The best fit of ``model`` to ``data`` as a :class:`~analysis.fit.FitResult`, from
    ``init`` with the ``fixed`` mask, MINOS-like intervals for the parameters in ``minos``.

    ``method="newton"`` (the default): the batched Newton minimum
    (:func:`~analysis.inference.mle.free_fit`, multi-started on kinked parameters), then
    :func:`analysis.fit.fit_model` with ``method="newton"`` from it (from ``init`` directly
    when no free parameter has a kink: the same Newton fit, once): the exact minimum, the
    covariance ``2 H^-1`` of the exact Hessian (from the model's structure,
    :mod:`analysis.likelihood.derivatives`), parameters on a bound flagged, the POI on a bound
    with its one-sided profile error, MINOS by root finding on the profile. Seconds on published
    likelihoods with hundreds of parameters, where MIGRAD + HESSE take minutes.

    ``method="minuit"``: MIGRAD + HESSE (+ MINOS) from ``init``, as
    :func:`analysis.fit.fit_model` (cabinetry's and pyhf's numbers, HESSE's limit
    transformation included), checked against the batched Newton minimum: where Newton's twice
    NLL is lower by more than :data:`DIFFERENT_MINIMUM`, MIGRAD stopped in a local minimum and
    is run again from Newton's point.
    """
    if method == "newton" and not bool((model.kinked_parameters() & ~fixed).any()):
        # one start suffices (no kink to start on both sides of): the Newton fit of fit_model
        # from init is the minimum; a batched fit first would converge twice
        return fit_model(model, data, init=init, fixed=fixed, minos=minos, method="newton")
    with torch.no_grad():
        newton, newton_nll = free_fit(model, data, init=init, fixed=fixed)
    if method == "newton":
        return fit_model(model, data, init=newton, fixed=fixed, minos=minos, method="newton")

    def migrad(start: torch.Tensor) -> Any:
        return fit_model(model, data, init=start, fixed=fixed, minos=minos)

    result = migrad(init)
    if float(newton_nll) < float(result.twice_nll) - DIFFERENT_MINIMUM:
        log.info(
            "MIGRAD stopped at twice NLL %.6f, Newton found %.6f: refitting from there",
            float(result.twice_nll),
            float(newton_nll),
        )
        result = migrad(newton)
    return result
