"""Shared leaves of :mod:`analysis.inference` (pyhf's ``infer/utils.py``): its error, the POI
lookup, and the fit settings (initial values, bounds, fixed mask) that every function takes."""

from __future__ import annotations

import torch

from analysis.errors import AnalysisError, ConfigError


class InferenceError(AnalysisError, ArithmeticError):
    """An inference step cannot be done for this model or data (e.g. no bracketed limit)."""


def require_poi(model) -> int:
    """The POI's index in the parameters; ConfigError when the model has none."""
    if model.poi_index is None:
        raise ConfigError("the model has no parameter of interest (measurement POI missing)")
    return int(model.poi_index)


def _settings(model, init, bounds, fixed):
    """``init``, ``bounds`` (in the model's dtype) and the ``fixed`` mask as tensors on the
    model's device; the model's suggested ones where ``None``."""
    init = (
        model.suggested_init()
        if init is None
        else torch.as_tensor(init, dtype=model.dtype, device=model.device)
    )
    bounds = (
        model.suggested_bounds()
        if bounds is None
        else torch.as_tensor(bounds, dtype=model.dtype, device=model.device)
    )
    fixed = (
        model.suggested_fixed()
        if fixed is None
        else torch.as_tensor(fixed, dtype=torch.bool, device=model.device)
    )
    return init, bounds, fixed
