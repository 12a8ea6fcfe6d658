"""The result records of :mod:`analysis.inference`: small frozen dataclasses with cabinetry's and
pyhf's field names (``bestfit``, ``uncertainty``, ``labels``, ``cls_obs``, ``cls_exp``, ...).

Tensors stay tensors in the records. Each record has ``to_dict``, the JSON that the ``diffana``
command of its name writes (``hypotest``, ``limit`` and ``ranking`` add a few keys of their own;
an impact that could not be computed, NaN, becomes ``null``) and, where a plot reads that file
back, the inverse ``from_dict`` (``from_scan`` for the CLs curve that ``diffana limit`` stores
beside the limits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch


def _float64(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _number_or_none(value: torch.Tensor) -> float | None:
    """A float for JSON, ``None`` (null) where it is NaN."""
    number = float(value.detach())
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class HypotestResult:
    """CLs of a hypothesis test at each tested POI value (leading shape of ``poi_value``)."""

    poi_value: torch.Tensor
    test_stat: str
    teststat: torch.Tensor  # the observed q (q_mu, q~_mu or q0)
    cls_obs: torch.Tensor  # CLs (CLs+b, i.e. the p-value, for q0)
    cls_exp: torch.Tensor  # (..., 5): -2 sigma .. +2 sigma
    clsb_obs: torch.Tensor
    clb_obs: torch.Tensor
    teststat_asimov: torch.Tensor | None = None  # q on the Asimov data (asymptotic tests)

    def to_dict(self) -> dict:
        return {
            "poi_value": self.poi_value.detach().tolist(),
            "test_stat": self.test_stat,
            "teststat": self.teststat.detach().tolist(),
            "cls_obs": self.cls_obs.detach().tolist(),
            "cls_exp": self.cls_exp.detach().tolist(),
        }

    @classmethod
    def from_scan(cls, scan: Mapping[str, Any], test_stat: str = "qtilde") -> HypotestResult:
        """CLs on a POI grid as ``diffana limit`` writes it (its ``scan``: ``poi_values``,
        ``cls_obs``, ``cls_exp``); the test statistic and CLs+b, CLb are not stored (NaN)."""
        poi = _float64(scan["poi_values"])
        nan = torch.full_like(poi, math.nan)
        return cls(
            poi, test_stat, nan, _float64(scan["cls_obs"]), _float64(scan["cls_exp"]), nan, nan
        )


@dataclass(frozen=True)
class SignificanceResult:
    """Discovery p-values and significances (observed, and expected under mu = 1)."""

    observed_p_value: float
    observed_significance: float
    expected_p_value: float
    expected_significance: float

    def to_dict(self) -> dict:
        return {
            "observed": {
                "p_value": self.observed_p_value,
                "significance": self.observed_significance,
            },
            "expected": {
                "p_value": self.expected_p_value,
                "significance": self.expected_significance,
            },
        }


@dataclass(frozen=True)
class LimitResult:
    """Upper limits on the POI at confidence level ``cl``: observed and the expected band."""

    cl: float
    observed: float
    expected: tuple[float, float, float, float, float]  # -2 sigma .. +2 sigma

    def to_dict(self) -> dict:
        return {"cl": self.cl, "observed": self.observed, "expected": list(self.expected)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> LimitResult:
        """The inverse of :meth:`to_dict` (a ``diffana limit`` JSON file)."""
        return cls(
            float(payload["cl"]),
            float(payload["observed"]),
            cast(
                "tuple[float, float, float, float, float]",
                tuple(float(x) for x in payload["expected"]),
            ),
        )


@dataclass(frozen=True)
class ScanResult:
    """Profile-likelihood scan: ``delta_twice_nll`` at each value of ``parameter``."""

    parameter: str
    bestfit: float
    uncertainty: float
    values: torch.Tensor
    delta_twice_nll: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "parameter": self.parameter,
            "bestfit": self.bestfit,
            "uncertainty": self.uncertainty,
            "values": self.values.detach().tolist(),
            "delta_twice_nll": self.delta_twice_nll.detach().tolist(),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ScanResult:
        """The inverse of :meth:`to_dict` (a ``diffana scan`` JSON file)."""
        return cls(
            payload["parameter"],
            float(payload["bestfit"]),
            float(payload["uncertainty"]),
            _float64(payload["values"]),
            _float64(payload["delta_twice_nll"]),
        )


@dataclass(frozen=True)
class RankingResult:
    """Impact of each nuisance parameter on the POI (cabinetry's RankingResults fields)."""

    labels: tuple[str, ...]
    bestfit: torch.Tensor
    uncertainty: torch.Tensor
    prefit_up: torch.Tensor
    prefit_down: torch.Tensor
    postfit_up: torch.Tensor
    postfit_down: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "ranking": [
                {
                    "name": name,
                    "bestfit": float(self.bestfit[i].detach()),
                    "uncertainty": float(self.uncertainty[i].detach()),
                    "prefit_up": _number_or_none(self.prefit_up[i]),
                    "prefit_down": _number_or_none(self.prefit_down[i]),
                    "postfit_up": _number_or_none(self.postfit_up[i]),
                    "postfit_down": _number_or_none(self.postfit_down[i]),
                }
                for i, name in enumerate(self.labels)
            ]
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RankingResult:
        """The inverse of :meth:`to_dict` (a ``diffana ranking`` JSON file)."""
        entries = payload["ranking"]

        def column(key: str) -> torch.Tensor:  # null: an impact that could not be computed
            return _float64([math.nan if entry[key] is None else entry[key] for entry in entries])

        return cls(
            tuple(entry["name"] for entry in entries),
            *(
                column(key)
                for key in (
                    "bestfit",
                    "uncertainty",
                    "prefit_up",
                    "prefit_down",
                    "postfit_up",
                    "postfit_down",
                )
            ),
        )


@dataclass(frozen=True)
class GoodnessOfFit:
    """Saturated-model goodness of fit."""

    delta_twice_nll: float
    ndof: int
    p_value: float

    def to_dict(self) -> dict:
        return {"delta_twice_nll": self.delta_twice_nll, "ndof": self.ndof, "p_value": self.p_value}
