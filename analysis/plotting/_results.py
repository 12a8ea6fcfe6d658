"""Result records or their JSON dict forms (the ``diffana`` CLI outputs) as numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.inference import RankingResult


def array(value: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor, list or number (detached, on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def field(result: Any, name: str) -> Any:
    """``result.name`` for a record, ``result[name]`` for its dict form."""
    if isinstance(result, Mapping):
        if name not in result:
            raise ValueError(f"result has no '{name}' (keys: {', '.join(map(str, result))})")
        return result[name]
    if not hasattr(result, name):
        raise ValueError(f"{type(result).__name__} has no '{name}'")
    return getattr(result, name)


@dataclass(frozen=True)
class Fit:
    labels: tuple[str, ...]
    bestfit: np.ndarray
    uncertainty: np.ndarray
    corr_mat: np.ndarray


def fit(result: Any) -> Fit:
    """An :class:`analysis.fit.FitResult` or the ``diffana fit`` JSON."""
    labels = tuple(field(result, "labels"))
    out = Fit(
        labels,
        array(field(result, "bestfit")).reshape(-1),
        array(field(result, "uncertainty")).reshape(-1),
        array(field(result, "corr_mat")).reshape(len(labels), len(labels)),
    )
    if out.bestfit.shape != (len(labels),) or out.uncertainty.shape != (len(labels),):
        raise ValueError("fit result: bestfit and uncertainty need one value per label")
    return out


@dataclass(frozen=True)
class Ranking:
    labels: tuple[str, ...]
    bestfit: np.ndarray
    uncertainty: np.ndarray
    prefit_up: np.ndarray
    prefit_down: np.ndarray
    postfit_up: np.ndarray
    postfit_down: np.ndarray


_RANKING_FIELDS = (
    "bestfit",
    "uncertainty",
    "prefit_up",
    "prefit_down",
    "postfit_up",
    "postfit_down",
)


def ranking(result: Any) -> Ranking:
    """An :class:`analysis.inference.RankingResult` or the ``diffana ranking`` JSON
    (``{"ranking": [{"name", "bestfit", ...}, ...]}``, read by ``RankingResult.from_dict``)."""
    if isinstance(result, Mapping) and "ranking" in result:
        result = RankingResult.from_dict(result)
    return Ranking(
        tuple(field(result, "labels")),
        *(array(field(result, key)).reshape(-1) for key in _RANKING_FIELDS),
    )


@dataclass(frozen=True)
class Scan:
    parameter: str
    bestfit: float
    uncertainty: float
    values: np.ndarray
    delta_twice_nll: np.ndarray


def scan(result: Any) -> Scan:
    """An :class:`analysis.inference.ScanResult` or the ``diffana scan`` JSON."""
    return Scan(
        str(field(result, "parameter")),
        float(field(result, "bestfit")),
        float(field(result, "uncertainty")),
        array(field(result, "values")).reshape(-1),
        array(field(result, "delta_twice_nll")).reshape(-1),
    )


@dataclass(frozen=True)
class Hypotests:
    poi_values: np.ndarray
    cls_obs: np.ndarray
    cls_exp: np.ndarray  # (k, 5): -2 sigma .. +2 sigma


def hypotests(result: Any) -> Hypotests:
    """An :class:`analysis.inference.HypotestResult` at a vector of POI values (or its JSON),
    sorted by POI value."""
    poi = array(field(result, "poi_value")).reshape(-1)
    obs = array(field(result, "cls_obs")).reshape(-1)
    exp = array(field(result, "cls_exp")).reshape(-1, 5)
    if not poi.shape[0] == obs.shape[0] == exp.shape[0]:
        raise ValueError(
            f"hypotest result: {poi.shape[0]} POI values, {obs.shape[0]} observed CLs and "
            f"{exp.shape[0]} expected sets"
        )
    order = np.argsort(poi, kind="stable")
    return Hypotests(poi[order], obs[order], exp[order])


@dataclass(frozen=True)
class Limits:
    cl: float
    observed: float
    expected: np.ndarray  # (5,): -2 sigma .. +2 sigma


def limits(result: Any) -> Limits:
    """An :class:`analysis.inference.LimitResult` or the ``diffana limit`` JSON."""
    expected = array(field(result, "expected")).reshape(-1)
    if expected.shape != (5,):
        raise ValueError(f"limit result: expected needs 5 values, got {expected.shape[0]}")
    return Limits(float(field(result, "cl")), float(field(result, "observed")), expected)
