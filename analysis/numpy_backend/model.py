r"""The HistFactory model in numpy, with pyhf's semantics, names and order, and exact
derivatives: what :class:`analysis.likelihood.Model` computes, for small models, without torch.

.. math::

    -2\log L = -2\Big[\sum_b n_b\log\lambda_b - \lambda_b - \log\Gamma(n_b+1)
        + \sum_{j\,\mathrm{normal}} \log\mathrm{Gaus}(a_j \mid \theta_j, \sigma_j)
        + \sum_{k\,\mathrm{Poisson}} \log\mathrm{Pois}(a_k \mid \theta_k\tau_k)\Big]

with :math:`\lambda_b = \sum_{c \in b} M_c A_c` over the cells ``c`` (channel, sample, bin) of
bin ``b``: :math:`M_c = \prod_t f_t(\theta_{p(t,c)})`, the product of the multiplicative terms
(normfactor, lumi, staterror, shapesys, shapefactor: the parameter itself; normsys: the code-1
or code-4 interpolation), and :math:`A_c = \nu_c + \sum_s \delta_s(\alpha_{p(s,c)})`, the
nominal yield plus the histosys deltas (code 0 or 4p). Every term depends on one parameter, so
(Cranmer et al., CERN-OPEN-2012-016; the interpolation codes as in
:mod:`analysis.likelihood.interpolation`)

.. math::

    \partial_p \lambda_b = \sum_{c\in b}\Big[\sum_{t: p(t,c)=p} f_t'\,M_c^{(t)} A_c
        + M_c \sum_{s: p(s,c)=p} \delta_s'\Big],

with :math:`M_c^{(t)}` the product without term ``t`` (and :math:`M_c^{(t,t')}` without two),
and the Hessian of :math:`-2\log L` is

.. math::

    H = 2\sum_b \frac{n_b}{\lambda_b^2}\,\nabla\lambda_b\nabla\lambda_b^T
      - 2\sum_c \Big(\frac{n_{b(c)}}{\lambda_{b(c)}} - 1\Big)\nabla^2 r_c
      + H_\mathrm{constraints},

where :math:`\nabla^2 r_c` of the cell rate :math:`r_c = M_c A_c` has the entries
:math:`f_t' f_{t'}' M^{(t,t')} A`, :math:`f_t'' M^{(t)} A`, :math:`f_t' M^{(t)} \delta_s'` and
:math:`M \delta_s''`. Gaussian constraints add :math:`2/\sigma^2` on the diagonal, Poisson
ones :math:`2a/\theta^2`.

Conventions (pyhf's, as the torch model): channels sorted by name, samples sorted within a
channel; parameter sets registered type by type in alphabetical type order, within a type in
order of first use (staterror sets sorted by name), each merged with the measurement's
settings; data are the main bins in channel order, then the auxiliary data in parameter order.
A spec that the torch model would refuse, or that this module does not cover, raises
:class:`~analysis.numpy_backend.Unsupported`: the torch engine then builds the model and names
the problem.

Shapes: ``pars`` is ``(P,)`` or ``(B, P)``, ``data`` ``(N,)`` or ``(B, N)``; results carry the
batch of ``pars`` (and of ``data``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from analysis.likelihood.workspace import MODIFIER_TYPES  # pyhf's (alphabetical) order
from analysis.numpy_backend import Unsupported

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

#: interpolation codes per type (the first is the type's default when settings name others)
INTERPCODES = {"histosys": ("code0", "code4p"), "normsys": ("code1", "code4")}
#: pyhf.Model's modifier settings when none are given
DEFAULT_INTERPCODES = {"histosys": "code4p", "normsys": "code4"}
KINKED_CODES = frozenset({"code0", "code1"})
CONFIGURABLE = ("inits", "bounds", "auxdata", "factors", "sigmas", "fixed")

# kinds of multiplicative slots
_PAD, _PARAMETER, _NORMSYS = 0, 1, 2


class _ParamSet:
    """One parameter set: its requirement merged with the measurement's settings."""

    def __init__(self, name: str, req: dict, user: Mapping[str, Any] | None) -> None:
        values = {key: req.get(key) for key in CONFIGURABLE}
        for key, value in (user or {}).items():
            if key == "name":
                continue
            if key not in CONFIGURABLE or key in req["unused"]:
                raise Unsupported(f"measurement setting '{key}' of parameter '{name}'")
            if key != "fixed" and len(value) != req["n"]:
                raise Unsupported(f"measurement '{key}' of '{name}' has the wrong length")
            values[key] = value
        missing = [k for k in ("inits", "bounds") if values[k] is None]
        if req["constraint"] and values["auxdata"] is None:
            missing.append("auxdata")
        if (
            req["constraint"] == "normal"
            and values["sigmas"] is None
            and "sigmas" not in req["unused"]
        ):
            missing.append("sigmas")
        if missing:
            raise Unsupported(f"parameter '{name}' needs {', '.join(missing)} from the measurement")
        n = req["n"]
        self.name, self.n, self.is_scalar = name, n, req["is_scalar"]
        self.constraint = req["constraint"]
        fixed = values["fixed"] if values["fixed"] is not None else False
        self.fixed = (
            np.full(n, bool(fixed))
            if isinstance(fixed, bool)
            else np.array([bool(f) for f in fixed])
        )
        if self.fixed.shape != (n,):
            raise Unsupported(f"fixed of '{name}' has the wrong length")
        self.inits = np.asarray(values["inits"], dtype=float).reshape(-1)
        self.bounds = np.asarray(values["bounds"], dtype=float)
        if self.bounds.shape != (n, 2) or self.inits.shape != (n,):
            raise Unsupported(f"inits or bounds of '{name}' have the wrong shape")
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        if (low > high).any() or (~self.fixed & ((self.inits < low) | (self.inits > high))).any():
            raise Unsupported(f"bounds or inits of '{name}'")  # the torch engine's warning or error
        self.auxdata = self.sigmas = self.factors = None
        if self.constraint:
            self.auxdata = np.asarray(values["auxdata"], dtype=float).reshape(n)
        if self.constraint == "normal":
            sigmas = values["sigmas"]
            self.sigmas = np.ones(n) if sigmas is None else np.asarray(sigmas, float).reshape(n)
        if self.constraint == "poisson":
            self.factors = np.asarray(values["factors"], dtype=float).reshape(n)

    def names(self) -> list[str]:
        return [self.name] if self.is_scalar else [f"{self.name}[{i}]" for i in range(self.n)]


def _requirement(n: int, constraint: str | None, inits, bounds, **extra: Any) -> dict:
    unused = {
        None: {"auxdata", "sigmas", "factors"},
        "normal": {"factors"},
        "poisson": {"sigmas"},
    }[constraint]
    req = {
        "n": n,
        "is_scalar": extra.pop("is_scalar", False),
        "constraint": constraint,
        "inits": inits,
        "bounds": bounds,
        "fixed": extra.pop("fixed", False),
        "unused": frozenset(extra.pop("unused", unused)),
    }
    req.update(extra)
    return req


def _signature(req: dict) -> tuple:
    def freeze(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return tuple(value.reshape(-1).tolist())
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    keys = ("n", "is_scalar", "constraint", "inits", "bounds", "fixed", "auxdata", "sigmas")
    return tuple(freeze(req.get(k)) for k in (*keys, "factors", "unused"))


def _alpha_requirement() -> dict:
    return _requirement(
        1,
        "normal",
        (0.0,),
        ((-5.0, 5.0),),
        is_scalar=True,
        auxdata=(0.0,),
        unused={"sigmas", "factors"},
    )


def _interpcodes(settings: Mapping[str, Any] | None) -> dict[str, str]:
    if settings is None:
        return dict(DEFAULT_INTERPCODES)
    codes = {kind: allowed[0] for kind, allowed in INTERPCODES.items()}
    for kind, setting in settings.items():
        if kind not in INTERPCODES or set(setting) - {"interpcode"}:
            raise Unsupported(f"modifier setting of '{kind}'")
        code = setting.get("interpcode", INTERPCODES[kind][0])
        if code not in INTERPCODES[kind]:
            raise Unsupported(f"interpolation code '{code}' of {kind}")
        codes[kind] = code
    return codes


def _code4_coefficients(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """a_1..a_6 (6, U) of the code-4 polynomial: value, slope and curvature of
    :math:`\\kappa_+^{\\alpha}` at 1 and :math:`\\kappa_-^{-\\alpha}` at -1."""
    powers = np.arange(1, 7)
    rows = []
    for x in (1.0, -1.0):
        rows.append(x**powers)
    for x in (1.0, -1.0):
        rows.append(powers * x ** (powers - 1))
    for x in (1.0, -1.0):
        rows.append(np.where(powers >= 2, powers * (powers - 1) * x ** (powers - 2.0), 0.0))
    matrix = np.array([rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]])
    log_hi, log_lo = np.log(hi), np.log(lo)
    rhs = np.stack([hi - 1.0, lo - 1.0, log_hi * hi, -log_lo * lo, log_hi**2 * hi, log_lo**2 * lo])
    return np.linalg.solve(matrix, rhs)


class NumpyModel:
    """A HistFactory model of a pyhf *model* spec (``channels`` and the measurement's
    ``parameters``), numbers in float64; see the module docstring.

    Args:
        spec: ``{"channels": [...], "parameters": [...]}``, valid against pyhf's schema.
        poi_name: the parameter of interest, or ``None``.
        modifier_settings: pyhf's, e.g. ``{"normsys": {"interpcode": "code1"}}``; ``None``
            means pyhf's model default (normsys code4, histosys code4p).
        source: the workspace's name, for messages.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        *,
        poi_name: str | None = None,
        modifier_settings: Mapping[str, Any] | None = None,
        source: str = "model",
    ) -> None:
        self.source = source
        codes = _interpcodes(modifier_settings)
        self._codes = codes
        blocks = self._blocks(spec)
        self._staterror_offsets: dict[str, dict[str, int]] = {}
        self._lgamma_sums: dict[bytes, np.ndarray] = {}
        requirements, uses = self._requirements(blocks)
        user: dict[str, Mapping[str, Any]] = {}
        for entry in spec.get("parameters", []) or []:
            if entry["name"] in user:
                raise Unsupported(f"parameter '{entry['name']}' configured twice")
            user[entry["name"]] = entry
        if not requirements:
            raise Unsupported("no parameters")
        self._sets = [
            _ParamSet(name, reqs[0][1], user.get(name)) for name, reqs in requirements.items()
        ]
        slices, names, start = {}, [], 0
        for ps in self._sets:
            slices[ps.name] = slice(start, start + ps.n)
            names += ps.names()
            start += ps.n
        self.par_slices: dict[str, slice] = slices
        self.par_names: tuple[str, ...] = tuple(names)
        self.npars = start
        kinked_types = {t for t, c in codes.items() if c in KINKED_CODES}
        self._kinked = np.zeros(self.npars, dtype=bool)
        for name, reqs in requirements.items():
            if any(t in kinked_types for t, _ in reqs):
                self._kinked[slices[name]] = True
        self._build_terms(blocks, uses)
        self._build_constraints()
        self.poi_name: str | None = None
        self.poi_index: int | None = None
        if poi_name:
            if poi_name not in slices or slices[poi_name].stop - slices[poi_name].start != 1:
                raise Unsupported(f"POI '{poi_name}'")
            self.poi_name, self.poi_index = poi_name, slices[poi_name].start

    # ------------------------------------------------------------------ structure
    def _blocks(self, spec: Mapping[str, Any]) -> list[dict]:
        """(channel, sample) blocks in pyhf's order, with their modifier uses sorted by
        ``(name, type)`` (of a repeated shared modifier the last one)."""
        channels = sorted(spec["channels"], key=lambda c: c["name"])
        self.channels: tuple[str, ...] = tuple(c["name"] for c in channels)
        self.channel_nbins: dict[str, int] = {}
        self.channel_slices: dict[str, slice] = {}
        blocks: list[dict] = []
        cells = bins = 0
        for channel in channels:
            samples = channel["samples"]
            nbins = len(samples[0]["data"])
            self.channel_nbins[channel["name"]] = nbins
            self.channel_slices[channel["name"]] = slice(bins, bins + nbins)
            if len({s["name"] for s in samples}) != len(samples):
                raise Unsupported("repeated sample names")
            for sample in sorted(samples, key=lambda s: s["name"]):
                nominal = np.asarray(sample["data"], dtype=float)
                if nominal.shape != (nbins,):
                    raise Unsupported("sample with another bin count")
                mods: dict[tuple[str, str], Mapping[str, Any]] = {}
                for mod in sample["modifiers"]:
                    key = (mod["name"], mod["type"])
                    if mod["type"] not in MODIFIER_TYPES:
                        raise Unsupported(f"modifier type {mod['type']}")
                    if key in mods and mod["type"] == "shapesys":
                        raise Unsupported("a modifier twice on one sample")
                    mods[key] = mod
                blocks.append(
                    {
                        "channel": channel["name"],
                        "sample": sample["name"],
                        "cells": slice(cells, cells + nbins),
                        "bins": slice(bins, bins + nbins),
                        "nbins": nbins,
                        "nominal": nominal,
                        "mods": [mods[k] for k in sorted(mods)],
                    }
                )
                cells += nbins
            bins += nbins
        self.nmain, self._ncells = bins, cells
        self.samples: tuple[str, ...] = tuple(sorted({b["sample"] for b in blocks}))
        return blocks

    def _requirements(self, blocks: list[dict]) -> tuple[dict, dict]:
        """Parameter sets in pyhf's order with the requirements of every type that uses
        them, and per type its uses ``(name, block, modifier data)``."""
        uses: dict[str, list] = {t: [] for t in MODIFIER_TYPES}
        for block in blocks:
            for mod in block["mods"]:
                uses[mod["type"]].append((mod["name"], block, mod.get("data")))
        per_type: dict[str, dict[str, dict]] = {}
        for kind in MODIFIER_TYPES:
            names = list(dict.fromkeys(name for name, _, _ in uses[kind]))
            if kind == "staterror":
                names.sort()
            per_type[kind] = {
                name: self._type_requirement(kind, name, uses[kind]) for name in names
            }
        requirements: dict[str, list] = {}
        for kind, by_name in per_type.items():
            for name, req in by_name.items():
                requirements.setdefault(name, []).append((kind, req))
        for name, reqs in requirements.items():
            if any(_signature(r) != _signature(reqs[0][1]) for _, r in reqs[1:]):
                raise Unsupported(f"parameter '{name}' shared with different settings")
        return requirements, uses

    def _type_requirement(self, kind: str, name: str, uses: list) -> dict:
        mine = [(block, data) for n, block, data in uses if n == name]
        if kind in ("histosys", "normsys"):
            return _alpha_requirement()
        if kind == "normfactor":
            return _requirement(1, None, (1.0,), ((0.0, 10.0),), is_scalar=True)
        if kind == "lumi":
            return _requirement(1, "normal", None, None, is_scalar=True)
        if kind == "shapefactor":
            n = mine[0][0]["nbins"]
            if any(block["nbins"] > n for block, _ in mine):
                raise Unsupported("shapefactor on a channel with more bins")
            return _requirement(n, None, (1.0,) * n, ((0.0, 10.0),) * n)
        if kind == "shapesys":
            if len(mine) > 1:
                raise Unsupported("shapesys name on several samples")
            block, data = mine[0]
            unc = np.asarray(data, dtype=float)
            if unc.shape != (block["nbins"],):
                raise Unsupported("shapesys data length")
            valid = (block["nominal"] > 0) & (unc > 0)
            safe = np.where(valid, unc, 1.0)
            tau = np.where(valid, block["nominal"] ** 2 / safe**2, 1.0)
            n = block["nbins"]
            return _requirement(
                n,
                "poisson",
                (1.0,) * n,
                ((1e-10, 10.0),) * n,
                fixed=tuple((~valid).tolist()),
                auxdata=tau,
                factors=tau,
            )
        # staterror: one parameter per bin of every channel it acts on
        by_sample: dict[str, set] = {}
        for block, data in mine:
            if np.asarray(data, dtype=float).shape != (block["nbins"],):
                raise Unsupported("staterror data length")
            by_sample.setdefault(block["sample"], set()).add(block["channel"])
        if len({frozenset(v) for v in by_sample.values()}) > 1:
            raise Unsupported("staterror on different channels per sample")
        channels = [c for c in self.channels if c in next(iter(by_sample.values()))]
        rel2_parts, offsets, n = [], {}, 0
        for channel in channels:
            here = [(b, np.asarray(d, dtype=float)) for b, d in mine if b["channel"] == channel]
            total = np.sum([b["nominal"] for b, _ in here], axis=0)
            positive = total > 0
            safe = np.where(positive, total, 1.0)
            rel2 = np.sum([(u / safe) ** 2 for _, u in here], axis=0)
            rel2_parts.append(np.where(positive, rel2, 0.0))
            offsets[channel] = n
            n += here[0][0]["nbins"]
        rel2 = np.concatenate(rel2_parts)
        fixed = rel2 == 0
        self._staterror_offsets[name] = offsets
        return _requirement(
            n,
            "normal",
            (1.0,) * n,
            ((1e-10, 10.0),) * n,
            fixed=tuple(fixed.tolist()),
            auxdata=(1.0,) * n,
            sigmas=np.where(fixed, 1.0, np.sqrt(np.where(fixed, 1.0, rel2))),
        )

    def _build_terms(self, blocks: list[dict], uses: dict[str, list]) -> None:
        """Per cell, the multiplicative slots (kind, parameter, normsys lo/hi) and the
        additive histosys slots (parameter, up and down deltas), padded to rectangles."""
        ncells = self._ncells
        mult: list[list[tuple]] = [[] for _ in range(ncells)]
        add: list[list[tuple]] = [[] for _ in range(ncells)]
        for kind in MODIFIER_TYPES:
            for name, block, data in uses[kind]:
                start = self.par_slices[name].start
                cells = range(block["cells"].start, block["cells"].stop)
                if kind in ("normfactor", "lumi"):
                    for c in cells:
                        mult[c].append((_PARAMETER, start, 1.0, 1.0))
                elif kind == "normsys":
                    lo, hi = float(data["lo"]), float(data["hi"])
                    for c in cells:
                        mult[c].append((_NORMSYS, start, lo, hi))
                elif kind in ("shapesys", "shapefactor"):
                    for j, c in enumerate(cells):
                        mult[c].append((_PARAMETER, start + j, 1.0, 1.0))
                elif kind == "staterror":
                    first = start + self._staterror_offsets[name][block["channel"]]
                    for j, c in enumerate(cells):
                        mult[c].append((_PARAMETER, first + j, 1.0, 1.0))
                else:  # histosys
                    lo_data = np.asarray(data["lo_data"], dtype=float)
                    hi_data = np.asarray(data["hi_data"], dtype=float)
                    if lo_data.shape != (block["nbins"],) or hi_data.shape != (block["nbins"],):
                        raise Unsupported("histosys data length")
                    for j, c in enumerate(cells):
                        nominal = block["nominal"][j]
                        add[c].append((start, hi_data[j] - nominal, nominal - lo_data[j]))
        tm = max(1, max(len(m) for m in mult))
        ta = max(1, max(len(a) for a in add))
        self._m_kind = np.zeros((tm, ncells), dtype=np.int8)
        self._m_par = np.zeros((tm, ncells), dtype=np.intp)
        self._m_lo = np.ones((tm, ncells))
        self._m_hi = np.ones((tm, ncells))
        for c, slots in enumerate(mult):
            for t, (kind, par, lo, hi) in enumerate(slots):
                self._m_kind[t, c], self._m_par[t, c] = kind, par
                self._m_lo[t, c], self._m_hi[t, c] = lo, hi
        normsys = self._m_kind == _NORMSYS
        if (self._m_lo[normsys] <= 0).any() or (self._m_hi[normsys] <= 0).any():
            raise Unsupported("normsys with a non-positive factor")
        if self._codes["normsys"] == "code4" and normsys.any():
            self._m_coef = _code4_coefficients(self._m_lo.ravel(), self._m_hi.ravel()).reshape(
                6, tm, ncells
            )
        self._a_par = np.zeros((ta, ncells), dtype=np.intp)
        self._a_up = np.zeros((ta, ncells))
        self._a_dn = np.zeros((ta, ncells))
        self._a_real = np.zeros((ta, ncells), dtype=bool)
        for c, slots in enumerate(add):
            for s, (par, up, dn) in enumerate(slots):
                self._a_par[s, c], self._a_up[s, c], self._a_dn[s, c] = par, up, dn
                self._a_real[s, c] = True
        self._nominal = np.concatenate([b["nominal"] for b in blocks])
        self._cell_bin = np.concatenate(
            [np.arange(b["bins"].start, b["bins"].stop) for b in blocks]
        )
        self._cell_sample = np.concatenate(
            [np.full(b["nbins"], self.samples.index(b["sample"])) for b in blocks]
        )
        # the Hessian's second-order entries: (slot, slot, cell) triples of real slots
        m_real = self._m_kind != _PAD
        npars = self.npars
        # (slot, slot, cell) of every cell where both slots hold a term
        self._mm = np.nonzero(m_real[:, None] & m_real[None])
        mt, mu, mc = self._mm
        mm_index = self._m_par[mt, mc] * npars + self._m_par[mu, mc]
        self._ma = np.nonzero(m_real[:, None] & self._a_real[None])
        mt, sa, mc = self._ma
        ma_index = self._m_par[mt, mc] * npars + self._a_par[sa, mc]
        ma_index_t = self._a_par[sa, mc] * npars + self._m_par[mt, mc]
        self._aa = np.nonzero(self._a_real)
        sa, ac = self._aa
        aa_index = self._a_par[sa, ac] * (npars + 1)
        cell_index = np.arange(self._ncells)
        self._m_grad_index = cell_index * npars + self._m_par  # (Tm, C) into (C * P)
        self._a_grad_index = cell_index * npars + self._a_par
        self._hessian_sum = _Segments(np.concatenate([mm_index, ma_index, ma_index_t, aa_index]))
        self._bin_of_cell = (np.arange(self.nmain)[:, None] == self._cell_bin).astype(float)

    def _build_constraints(self) -> None:
        aux: list[np.ndarray] = []
        aux_par: list[int] = []
        scale: list[np.ndarray] = []
        inv_sigma: list[np.ndarray] = []
        poisson: list[np.ndarray] = []
        log_norm = 0.0
        for ps in self._sets:
            if ps.constraint is None:
                continue
            first = self.par_slices[ps.name].start
            assert ps.auxdata is not None  # constrained sets have auxdata
            aux.append(ps.auxdata)
            aux_par += range(first, first + ps.n)
            if ps.constraint == "normal":
                assert ps.sigmas is not None
                scale.append(np.ones(ps.n))
                inv_sigma.append(1.0 / ps.sigmas)
                poisson.append(np.zeros(ps.n, dtype=bool))
                log_norm -= float(np.sum(np.log(ps.sigmas) + _LOG_SQRT_2PI))
            else:
                assert ps.factors is not None
                scale.append(ps.factors)
                inv_sigma.append(np.zeros(ps.n))
                poisson.append(np.ones(ps.n, dtype=bool))

        def cat(parts: list, dtype: Any = float) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        self.auxdata = cat(aux)
        self.naux = self.auxdata.size
        self._aux_par = np.asarray(aux_par, dtype=np.intp)
        self._aux_scale = cat(scale)
        self._inv_sigma = cat(inv_sigma)
        self._poisson = cat(poisson, bool)
        self._gauss_log_norm = log_norm

    # ------------------------------------------------------------------ suggestions
    def suggested_init(self) -> np.ndarray:
        return np.concatenate([ps.inits for ps in self._sets])

    def suggested_bounds(self) -> np.ndarray:
        return np.concatenate([ps.bounds for ps in self._sets])

    def suggested_fixed(self) -> np.ndarray:
        return np.concatenate([ps.fixed for ps in self._sets])

    def kinked_parameters(self) -> np.ndarray:
        """Free parameters of histosys code0 / normsys code1 sets (a kink at 0)."""
        return self._kinked & ~self.suggested_fixed()

    # ------------------------------------------------------------------ evaluation
    def _normsys(self, alpha: np.ndarray, order: int) -> tuple[np.ndarray, ...]:
        """normsys factors of every multiplicative slot (1 elsewhere) and, up to ``order``,
        their derivatives: the code-1 or code-4 interpolation of analysis.likelihood."""
        lo, hi = self._m_lo, self._m_hi
        if self._codes["normsys"] == "code4":
            inside = np.abs(alpha) < 1.0
            upper = alpha >= 1.0
            base = np.where(upper, hi, lo)
            log_base = np.log(base)
            outer = np.exp(log_base * np.where(inside, 1.0, np.abs(alpha)))
            coef = self._m_coef
            poly = coef[5]
            for i in range(4, -1, -1):
                poly = coef[i] + alpha * poly
            f = np.where(inside, 1.0 + alpha * poly, outer)
            if order == 0:
                return (f,)
            d1p = 6 * coef[5]
            for i in range(5, 0, -1):
                d1p = i * coef[i - 1] + alpha * d1p
            d2p = 30 * coef[5]
            for i in range(5, 1, -1):
                d2p = i * (i - 1) * coef[i - 1] + alpha * d2p
            slope = np.where(upper, log_base, -log_base)
            return f, np.where(inside, d1p, slope * f), np.where(inside, d2p, log_base**2 * f)
        positive = alpha > 0
        log_base = np.log(np.where(positive, hi, lo))
        f = np.exp(log_base * np.where(positive, alpha, -alpha))
        if order == 0:
            return (f,)
        return f, np.where(positive, log_base, -log_base) * f, log_base**2 * f

    def _histosys(self, alpha: np.ndarray, order: int) -> tuple[np.ndarray, ...]:
        """Deltas of every additive slot and, up to ``order``, their derivatives."""
        up, dn = self._a_up, self._a_dn
        if self._codes["histosys"] == "code4p":
            a2 = alpha * alpha
            inside = np.abs(alpha) <= 1.0
            t = a2 * (15.0 + a2 * (-10.0 + 3.0 * a2))
            w_up = np.where(inside, 0.5 * alpha + t / 16.0, np.where(alpha > 1.0, alpha, 0.0))
            w_dn = np.where(inside, 0.5 * alpha - t / 16.0, np.where(alpha < -1.0, alpha, 0.0))
            delta = w_up * up + w_dn * dn
            if order == 0:
                return (delta,)
            t1 = alpha * (30.0 + a2 * (-40.0 + 18.0 * a2))
            t2 = 30.0 + a2 * (-120.0 + 90.0 * a2)
            d_up = np.where(inside, 0.5 + t1 / 16.0, (alpha > 1.0).astype(float))
            d_dn = np.where(inside, 0.5 - t1 / 16.0, (alpha < -1.0).astype(float))
            dd = np.where(inside, t2 / 16.0, 0.0)
            return delta, d_up * up + d_dn * dn, dd * (up - dn)
        positive = alpha > 0
        delta = np.where(positive, alpha * up, alpha * dn)
        if order == 0:
            return (delta,)
        return delta, np.where(positive, up, dn), np.zeros_like(delta)

    def _slots(self, pars: np.ndarray, order: int) -> tuple:
        """Values (and derivatives) of the slots for ``pars`` (B, P): multiplicative
        ``(B, Tm, C)``, additive ``(B, Ta, C)``."""
        alpha = pars[:, self._m_par]
        kind = self._m_kind
        normsys = self._normsys(alpha, order) if (kind == _NORMSYS).any() else None
        is_par, is_norm = kind == _PARAMETER, kind == _NORMSYS
        values = np.where(is_par, alpha, 1.0)
        if normsys is not None:
            values = np.where(is_norm, normsys[0], values)
        deltas = self._histosys(pars[:, self._a_par], order) if self._a_real.any() else None
        if order == 0:
            return (values, None if deltas is None else deltas[0])
        d1 = is_par.astype(float) * np.ones_like(values)
        d2 = np.zeros_like(values)
        if normsys is not None:
            d1 = np.where(is_norm, normsys[1], d1)
            d2 = np.where(is_norm, normsys[2], d2)
        return values, d1, d2, deltas

    def _pars(self, pars: Any) -> tuple[np.ndarray, tuple]:
        pars = np.asarray(pars, dtype=float)
        return pars.reshape(-1, self.npars), pars.shape[:-1]

    def _cell_rates(self, pars: np.ndarray) -> np.ndarray:
        values, deltas = self._slots(pars, 0)
        added = self._nominal if deltas is None else self._nominal + deltas.sum(1)
        return values.prod(1) * added

    def _main(self, rates: np.ndarray) -> np.ndarray:
        return rates @ self._bin_of_cell.T

    def expected_actualdata(self, pars: Any) -> np.ndarray:
        x, batch = self._pars(pars)
        return self._main(self._cell_rates(x)).reshape(*batch, self.nmain)

    def expected_auxdata(self, pars: Any) -> np.ndarray:
        x, batch = self._pars(pars)
        return (x[:, self._aux_par] * self._aux_scale).reshape(*batch, self.naux)

    def expected_data(self, pars: Any, include_auxdata: bool = True) -> np.ndarray:
        main = self.expected_actualdata(pars)
        if not include_auxdata:
            return main
        return np.concatenate([main, self.expected_auxdata(pars)], axis=-1)

    def logpdf(self, pars: Any, data: Any) -> np.ndarray:
        """Full log-likelihood (pyhf's ``model.logpdf``)."""
        return -0.5 * self.twice_nll(pars, data)

    def twice_nll(self, pars: Any, data: Any) -> np.ndarray:
        """:math:`-2\\log L`."""
        with np.errstate(all="ignore"):  # non-finite where a rate is <= 0, as in torch
            return self._twice_nll(pars, data)

    def _twice_nll(self, pars: Any, data: Any) -> np.ndarray:
        x, batch = self._pars(pars)
        data = np.asarray(data, dtype=float)
        n, aux, lgamma = self._split(data)
        lam = self._main(self._cell_rates(x))
        value = _poisson_terms(n, lam).sum(-1)
        value = value + self._constraint_terms(x, aux)
        out = -2.0 * (value - lgamma)
        return out.reshape(np.broadcast_shapes(batch, data.shape[:-1]))

    def _split(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        """Main data, auxiliary data and the sum of log Gamma(n + 1) of the Poisson terms."""
        flat = data.reshape(-1, data.shape[-1])
        if flat.shape[-1] != self.nmain + self.naux:
            raise ValueError(
                f"data has {flat.shape[-1]} entries, the model {self.nmain + self.naux}"
            )
        n, aux = flat[:, : self.nmain], flat[:, self.nmain :]
        key = flat.tobytes()
        lgamma = self._lgamma_sums.get(key)
        if lgamma is None:  # constant in the parameters: once per dataset (fits call often)
            counted = np.concatenate([n, aux[:, self._poisson]], axis=1).tolist()
            lgamma = np.array([math.fsum(math.lgamma(v + 1.0) for v in row) for row in counted])
            if len(self._lgamma_sums) >= 64:
                self._lgamma_sums.clear()
            self._lgamma_sums[key] = lgamma
        return n, aux, lgamma

    def _constraint_terms(self, x: np.ndarray, aux: np.ndarray) -> np.ndarray:
        """Constraint log-density without the Poisson terms' log Gamma."""
        if not self.naux:
            return np.zeros(max(x.shape[0], aux.shape[0]))
        theta = x[:, self._aux_par]
        z = (aux - theta) * self._inv_sigma
        terms = -0.5 * z * z
        if self._poisson.any():
            expected = theta * self._aux_scale
            pois = _poisson_terms(aux, expected)
            terms = np.where(self._poisson, pois, terms)
        return terms.sum(-1) + self._gauss_log_norm

    def twice_nll_derivatives(
        self, pars: Any, data: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:math:`-2\\log L`, its gradient and its Hessian, exact (module docstring)."""
        with np.errstate(all="ignore"):  # non-finite where a rate is <= 0: the fits reject
            return self._derivatives(pars, data)

    def _derivatives(self, pars: Any, data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, batch = self._pars(pars)
        data = np.asarray(data, dtype=float)
        n, aux, lgamma = self._split(data)
        b = max(x.shape[0], n.shape[0])
        p = self.npars
        x = _rows(x, b)
        values, d1, d2, deltas = self._slots(x, 2)
        tm = values.shape[1]
        # products without one and without two slots, exact with zero factors
        ones = np.ones_like(values[:, :1])
        prefix = np.cumprod(np.concatenate([ones, values[:, :-1]], axis=1), axis=1)
        suffix = np.cumprod(np.concatenate([ones, values[:, :0:-1]], axis=1), axis=1)[:, ::-1]
        without = prefix * suffix  # (B, Tm, C)
        product = without[:, 0] * values[:, 0]
        added = self._nominal if deltas is None else self._nominal + deltas[0].sum(1)
        added = added * np.ones_like(product) if added.ndim == 1 else added
        rate = product * added
        lam = self._main(rate)
        # dlambda/dtheta, (B, nmain, P)
        cell_grad = np.zeros((values.shape[0], self._ncells * p))
        for t in range(tm):
            # one slot: distinct cells, distinct (cell, parameter) entries: a plain fancy add
            cell_grad[:, self._m_grad_index[t]] += d1[:, t] * without[:, t] * added
        if deltas is not None:
            for s in range(deltas[1].shape[1]):
                cell_grad[:, self._a_grad_index[s]] += deltas[1][:, s] * product
        cell_grad = cell_grad.reshape(-1, self._ncells, p)
        jac = self._bin_of_cell @ cell_grad  # (B, nmain, P): cells summed into their bins
        # Poisson terms: d/dlam (n log lam - lam) = n/lam - 1, d2 = -n/lam^2 (0 where n = 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            counted = n > 0
            ratio = np.where(counted, n / np.where(counted, lam, 1.0), 0.0)
            value = _poisson_terms(n, lam).sum(-1) + self._constraint_terms(x, aux) - lgamma
        first = _rows(ratio - 1.0, b)
        second = _rows(-ratio * ratio / np.where(counted, n, 1.0), b)
        # J^T first and J^T diag(second) J as batched matrix products (BLAS)
        grad = (first[:, None, :] @ jac)[:, 0]
        weighted = second[:, :, None] * jac
        hess = np.swapaxes(weighted, 1, 2) @ jac
        # second-order terms of the cell rates, weighted by d/dlam of their bin
        weight = first[:, self._cell_bin]  # (B, C)
        parts = []
        mt, mu, mc = self._mm
        if mt.size:
            both = self._without_two(values, mt, mu, mc)
            pair = np.where(
                mt == mu,
                d2[:, mt, mc] * without[:, mt, mc],
                d1[:, mt, mc] * d1[:, mu, mc] * both,
            )
            parts.append(pair * added[:, mc] * weight[:, mc])
        if deltas is not None:
            mt, sa, mc = self._ma
            cross = d1[:, mt, mc] * without[:, mt, mc] * deltas[1][:, sa, mc] * weight[:, mc]
            parts += [cross, cross]
            sa, ac = self._aa
            parts.append(product[:, ac] * deltas[2][:, sa, ac] * weight[:, ac])
        flat = np.zeros((b, p * p))
        self._hessian_sum.add(
            flat,
            np.concatenate(parts, axis=1) if parts else np.zeros((b, 0)),
        )
        hess = hess + flat.reshape(b, p, p)
        # constraints
        if self.naux:
            theta = x[:, self._aux_par]
            gauss = ~self._poisson
            g_aux = np.where(gauss, (aux - theta) * self._inv_sigma**2, 0.0)
            h_aux = np.where(gauss, -(self._inv_sigma**2), 0.0)
            if self._poisson.any():
                with np.errstate(divide="ignore", invalid="ignore"):
                    a_pos = aux > 0
                    g_pois = (
                        np.where(a_pos, aux / np.where(a_pos, theta, 1.0), 0.0) - self._aux_scale
                    )
                    h_pois = -np.where(a_pos, aux / np.where(a_pos, theta, 1.0) ** 2, 0.0)
                g_aux = np.where(self._poisson, g_pois, g_aux)
                h_aux = np.where(self._poisson, h_pois, h_aux)
            g_aux = _rows(g_aux, b)
            h_aux = _rows(h_aux, b)
            cons_g = np.zeros((b, p))
            cons_g[:, self._aux_par] += g_aux  # one constraint per parameter
            grad = grad + cons_g
            diag = np.zeros((b, p))
            diag[:, self._aux_par] += h_aux
            hess = hess + diag[:, :, None] * np.eye(p)
        shape = np.broadcast_shapes(batch, data.shape[:-1])
        return (
            (-2.0 * value).reshape(shape),
            (-2.0 * grad).reshape(*shape, p),
            (-2.0 * hess).reshape(*shape, p, p),
        )

    @staticmethod
    def _without_two(
        values: np.ndarray, mt: np.ndarray, mu: np.ndarray, mc: np.ndarray
    ) -> np.ndarray:
        """Product of the slots of cell ``mc`` without slots ``mt`` and ``mu`` (B, K)."""
        chosen = values[:, :, mc]  # (B, Tm, K)
        k = np.arange(mc.size)
        keep = np.ones(chosen.shape[1:], dtype=bool)
        keep[mt, k] = False
        keep[mu, k] = False
        return np.where(keep, chosen, 1.0).prod(1)

    def __repr__(self) -> str:
        return (
            f"NumpyModel({self.source!r}: {len(self.channels)} channels, {self.nmain} bins, "
            f"{self.npars} parameters, poi={self.poi_name!r})"
        )


def _rows(values: np.ndarray, b: int) -> np.ndarray:
    """``values`` (1 or ``b`` rows, or one row's 1-D array) as ``b`` rows."""
    values = np.atleast_2d(values)
    return values if values.shape[0] == b else np.repeat(values, b, axis=0)


class _Segments:
    """Sums along axis 1 into the positions ``index`` (repeated positions accumulate): the
    entries are sorted by position once, then each call is one ``np.add.reduceat`` (ten times
    faster than ``np.add.at``)."""

    def __init__(self, index: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.intp)
        self.order = np.argsort(index, kind="stable")
        self.targets, self.starts = np.unique(index[self.order], return_index=True)

    def add(self, out: np.ndarray, values: np.ndarray) -> None:
        """``out[:, index[k]] += values[:, k]`` for every k."""
        if self.order.size:
            sorted_values = np.take(values, self.order, axis=1)
            out[:, self.targets] += np.add.reduceat(sorted_values, self.starts, axis=1)


def _poisson_terms(n: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """:math:`n\\log\\lambda - \\lambda` with :math:`0\\log 0 = 0` (no log Gamma)."""
    counted = n > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lam = np.log(np.where(counted, lam, 1.0))
    return np.where(counted, n * log_lam, 0.0) - lam
