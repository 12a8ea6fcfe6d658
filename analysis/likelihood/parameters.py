"""Parameter sets: what each modifier requires, merged with the measurement's settings.

A *parameter set* is one named group of model parameters (``mu``, ``staterror_SR`` with one
parameter per bin, ...). Each modifier type states a :class:`Requirement` per set it uses
(pyhf's ``required_parset``); several modifiers (e.g. a ``normsys`` and a ``histosys`` of the
same name) may share a set if their requirements agree. The measurement's ``parameters`` entries
then override ``inits``, ``bounds``, ``fixed``, ``auxdata``, ``sigmas`` and ``factors``, with the
checks pyhf makes (right number of values, no attribute the set does not use).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from analysis.errors import ConfigError
from analysis.likelihood._tensors import as_tensor

Constraint = Literal["normal", "poisson"] | None

log = logging.getLogger(__name__)

# attributes a measurement may set, in pyhf's order
CONFIGURABLE = ("inits", "bounds", "auxdata", "factors", "sigmas", "fixed")


@dataclass
class Requirement:
    """What one modifier needs from its parameter set (pyhf's ``required_parset``).

    ``None`` for ``inits``/``bounds``/``auxdata``/``sigmas`` means "the measurement must set
    it" (``lumi``); an attribute listed in ``unused`` may not be set by the measurement.
    Numeric attributes may be tensors (staterror ``sigmas``, shapesys ``factors``) that carry
    gradients from the spec.
    """

    n: int
    is_scalar: bool
    constraint: Constraint
    inits: Any
    bounds: Any
    fixed: bool | tuple[bool, ...]
    auxdata: Any = None
    sigmas: Any = None
    factors: Any = None
    unused: frozenset[str] = frozenset({"auxdata", "sigmas", "factors"})

    def signature(self) -> tuple:
        """A hashable summary to compare the requirements of modifiers sharing a set."""
        return (
            self.n,
            self.is_scalar,
            self.constraint,
            _freeze(self.inits),
            _freeze(self.bounds),
            _freeze(self.fixed),
            _freeze(self.auxdata),
            _freeze(self.sigmas),
            _freeze(self.factors),
            self.unused,
        )


@dataclass(frozen=True)
class ParamSet:
    """One parameter set of a built model; tensors in the model's dtype and device."""

    name: str
    n: int
    is_scalar: bool
    constraint: Constraint
    inits: torch.Tensor  # (n,)
    bounds: torch.Tensor  # (n, 2)
    fixed: tuple[bool, ...]
    auxdata: torch.Tensor | None  # (n,) for constrained sets
    sigmas: torch.Tensor | None  # (n,) Gaussian widths
    factors: torch.Tensor | None  # (n,) Poisson rate factors

    def names(self) -> list[str]:
        """Expanded parameter names: ``name`` for a scalar set, ``name[i]`` otherwise."""
        if self.is_scalar:
            return [self.name]
        return [f"{self.name}[{i}]" for i in range(self.n)]


def _within_bounds(
    name: str, inits: torch.Tensor, bounds: torch.Tensor, fixed: tuple[bool, ...], source: str
) -> torch.Tensor:
    """``inits`` with a free parameter's start outside its bounds moved onto the nearer bound
    (as scipy's minimisers, pyhf's default, start), with a warning; ConfigError for bounds
    whose lower end lies above the upper one. A fixed parameter keeps its value."""
    low, high = bounds[:, 0], bounds[:, 1]
    inverted = (low > high).tolist()
    if any(inverted):
        i = inverted.index(True)
        label = name if len(inverted) == 1 else f"{name}[{i}]"
        raise ConfigError(
            f"{source}: bounds of parameter '{label}' are [{float(low[i]):g}, "
            f"{float(high[i]):g}]: the lower bound lies above the upper one"
        )
    free = torch.tensor([not f for f in fixed], device=inits.device)
    outside = free & ((inits < low) | (inits > high))
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        label = name if inits.numel() == 1 else f"{name}[{i}]"
        log.warning(
            "%s: the initial value %g of '%s' lies outside its bounds [%g, %g]: fits start on "
            "the nearer bound",
            source,
            float(inits[i]),
            label,
            float(low[i]),
            float(high[i]),
        )
        inits = torch.where(outside, torch.minimum(torch.maximum(inits, low), high), inits)
    return inits


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.detach().cpu().reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def merge(
    name: str,
    requirements: Sequence[tuple[str, Requirement]],
    user: Mapping[str, Any] | None,
    *,
    source: str,
    dtype: torch.dtype,
    device: torch.device,
) -> ParamSet:
    """The parameter set ``name`` from its modifiers' requirements and the measurement entry.

    ``requirements`` holds ``(modifier type, requirement)`` pairs; they must agree (pyhf raises
    ``InvalidNameReuse`` otherwise).
    """
    first_type, req = requirements[0]
    for other_type, other in requirements[1:]:
        if other.signature() != req.signature():
            raise ConfigError(
                f"{source}: parameter '{name}' is used by a {first_type} and a {other_type} "
                "modifier that need different parameter settings; use distinct modifier names"
            )
    values: dict[str, Any] = {
        "inits": req.inits,
        "bounds": req.bounds,
        "fixed": req.fixed,
        "auxdata": req.auxdata,
        "sigmas": req.sigmas,
        "factors": req.factors,
    }
    for key, value in (user or {}).items():
        if key == "name":
            continue
        if key not in CONFIGURABLE:
            raise ConfigError(f"{source}: unknown setting '{key}' for parameter '{name}'")
        if key in req.unused:
            raise ConfigError(
                f"{source}: measurement sets '{key}' for parameter '{name}', which does not use it"
            )
        if key != "fixed" and len(value) != req.n:
            raise ConfigError(
                f"{source}: measurement gives {len(value)} value(s) of '{key}' for parameter "
                f"'{name}', but it has {req.n} component(s)"
            )
        values[key] = value
    needed = ["inits", "bounds"] + (["auxdata"] if req.constraint else [])
    missing = [key for key in needed if values[key] is None]
    if req.constraint == "normal" and values["sigmas"] is None and "sigmas" not in req.unused:
        missing.append("sigmas")
    if missing:
        raise ConfigError(
            f"{source}: parameter '{name}' needs {', '.join(missing)} in the measurement's "
            "parameters (e.g. lumi: auxdata, sigmas, inits, bounds)"
        )
    fixed = values["fixed"]
    fixed = (bool(fixed),) * req.n if isinstance(fixed, bool) else tuple(bool(f) for f in fixed)

    def tensor(key: str) -> torch.Tensor | None:
        value = values[key]
        return None if value is None else as_tensor(value, dtype=dtype, device=device)

    bounds = tensor("bounds")
    if bounds is not None and tuple(bounds.shape) != (req.n, 2):
        raise ConfigError(
            f"{source}: bounds of parameter '{name}' must be {req.n} pair(s) [low, high]"
        )
    inits = cast(torch.Tensor, tensor("inits"))  # needed: checked above
    inits = _within_bounds(name, inits, cast(torch.Tensor, bounds), fixed, source)
    factors = tensor("factors") if req.constraint == "poisson" else None
    sigmas = None
    if req.constraint == "normal":
        sigmas = tensor("sigmas")
        if sigmas is None:
            sigmas = torch.ones(req.n, dtype=dtype, device=device)
    return ParamSet(
        name=name,
        n=req.n,
        is_scalar=req.is_scalar,
        constraint=req.constraint,
        inits=inits,
        bounds=cast(torch.Tensor, bounds),
        fixed=fixed,
        auxdata=tensor("auxdata") if req.constraint else None,
        sigmas=sigmas,
        factors=factors,
    )
