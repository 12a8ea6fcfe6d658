"""Deterministic generator of a dimuon resonance search: Monte Carlo samples and pseudo-data.

The generated ntuples are a *dimuon skim*: every event has at least two muons with
``|eta| < 2.4``, the leading one with ``pt > 20 GeV`` and the sub-leading one with
``pt > 10 GeV`` (these are the two "primary" muons of the process; 3 or 4 muons occur when soft
non-prompt muons from heavy-flavour decays are added). Jets have ``pt > 25 GeV`` and
``|eta| < 2.4``. Four processes are modelled (see :data:`SAMPLES` and the ``_generate_<name>``
functions for each model):

- ``signal``: a narrow dimuon resonance at 150 GeV,
- ``drell_yan``: Z/gamma* -> mu mu, the Z peak plus a falling continuum (irreducible),
- ``ttbar``: dileptonic top pairs, two b-jets and missing transverse momentum (negative weights),
- ``multijet``: soft non-isolated fake/non-prompt muons in QCD events.

Files (see :func:`generate`): ``<sample>.root`` with TTrees ``events``, ``events_MuonScaleUp``
and ``events_MuonScaleDown``, and ``data.root`` (pseudo-data) with one TTree ``events``.

Branches (one entry per event; ``Muon_*`` and ``Jet_*`` are jagged, sorted by pt descending)::

    event                     int64    event number, 0..N-1 within a file
    nMuon, Muon_pt/eta/phi    int32, float32  (pt in GeV)
    Muon_charge               int32    +-1
    Muon_iso                  float32  relative isolation (sum of nearby pt / muon pt), >= 0
    nJet, Jet_pt/eta          int32, float32
    Jet_btag                  float32  b-tag discriminant in [0, 1] (b jets near 1)
    MET_pt, MET_phi           float32  missing transverse momentum (magnitude, direction)
    weight, weight_up, weight_down   float64  (Monte Carlo only)

Yields (at the default 140 fb^-1; :meth:`SampleSpec.expected_yield`): signal 11.9,
Drell-Yan 1260, ttbar 1890, multijet 2520 events. They are chosen so that the stat-only
expected significance in a 2 GeV-binned dimuon-mass histogram (130-170 GeV, Asimov
Z = sqrt(sum_b 2((s+b) ln(1+s/b) - s))) is ~2.7 with reasonable cuts (opposite charge, both
iso < 0.15, leading pt > 30 GeV, no jet with btag > 0.5, MET < 60 GeV) and ~4.1 with tuned ones
(iso < 0.08, sub-leading pt > 20 GeV, btag < 0.2, MET < 30 GeV): after the reasonable cuts the
reducible ttbar and multijet backgrounds dominate the signal region, and Drell-Yan is the
irreducible floor.

Control regions (``models/dimuon.yaml``) come from the same samples: with the reasonable muon
cuts, the Z peak (76 < m < 106 GeV, btag < 0.5, MET < 60 GeV) holds ~980 Drell-Yan events (93%;
ttbar 5%, multijet 2%, no signal), and a b-tagged jet with MET (btag > 0.8, MET > 40 GeV,
50 < m < 200 GeV) ~160 ttbar events (>99%). The pseudo-data hold Drell-Yan at 0.94 and ttbar
at 1.10 times the simulation (``SampleSpec.data_scale``, within their usual cross-section
uncertainties), so ~5800 events in all, and a fit with free normalisations of these two
processes in the control regions measures those numbers.

Randomness: every sample has its own :class:`numpy.random.Generator` stream,
``SeedSequence(seed, spawn_key=(crc32(name), purpose))`` with ``purpose`` 0 for Monte Carlo and
1 for its pseudo-data share, so the samples are independent of each other and of the order in
which they are produced. Output is a pure function of ``(events, seed, lumi, chunk_size)``: the
same arguments give identical arrays (a different ``chunk_size`` gives a different but
statistically equivalent sample).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import types
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import awkward as ak
import numpy as np
import uproot

__all__ = [
    "LUMINOSITY_FB",
    "MUON_SCALE",
    "SAMPLES",
    "SIGNAL_MASS",
    "SIGNAL_WIDTH",
    "Z_MASS",
    "Z_WIDTH",
    "SampleSpec",
    "generate",
]

log = logging.getLogger(__name__)

LUMINOSITY_FB: float = 140.0
"""Default integrated luminosity in fb^-1 (LHC Run 2)."""

MUON_SCALE: float = 0.01
"""Relative muon momentum-scale uncertainty, independent of pt: the ``events_MuonScaleUp/Down``
trees have every ``Muon_pt`` multiplied by ``1 +- MUON_SCALE``."""

SIGNAL_MASS: float = 150.0
"""Resonance mass in GeV."""

SIGNAL_WIDTH: float = 1.0
"""Resonance natural width in GeV (well below the ~3 GeV detector mass resolution)."""

Z_MASS: float = 91.1876
Z_WIDTH: float = 2.4952

# Dimuon skim (applied to the two primary muons) and object acceptance.
_ETA_MAX = 2.4
_LEAD_PT_MIN = 20.0
_SUBLEAD_PT_MIN = 10.0
_EXTRA_PT_MIN = 5.0
_JET_PT_MIN = 25.0

_MAX_MUONS = 4  # 2 primary + up to 2 extra
_MAX_LIGHT_JETS = 6
_MAX_JETS = _MAX_LIGHT_JETS + 2

# ZSTD level 1: as small as ZLIB(1) on these columns and ~10x faster to write; uproot reads it
# through cramjam (an uproot dependency), ROOT since 6.20.
_COMPRESSION = uproot.ZSTD(1)

_TREE_NOMINAL = "events"
_TREE_VARIATIONS = {"events_MuonScaleUp": 1.0, "events_MuonScaleDown": -1.0}
_DATA_NAME = "data"
_PURPOSE_MC, _PURPOSE_DATA, _PURPOSE_DATA_ORDER = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """One simulated process: its share of the generated events and its expected yield.

    ``cross_section_fb`` is the visible cross-section of the dimuon skim (cross-section times
    branching ratio times skim acceptance) in fb, so the expected number of events is
    ``expected_yield(lumi) = cross_section_fb * lumi`` with ``lumi`` in fb^-1. A fraction
    ``negative_weight_fraction`` of the events carries weight -1 x |w| (NLO matching with
    MC@NLO-type generators); it must be below 1/2 so the yield stays positive.
    ``data_scale`` is the process's true normalisation relative to the simulation: the
    pseudo-data hold ``Poisson(data_scale * expected_yield(lumi))`` of its events
    (:meth:`data_yield`), as real data differ from a prediction by its cross-section
    uncertainty; it is what a free normalisation factor fitted in a control region measures.
    """

    name: str
    description: str
    fraction: float
    cross_section_fb: float
    negative_weight_fraction: float = 0.0
    data_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction of {self.name!r} is {self.fraction}; expected (0, 1]")
        if not self.cross_section_fb > 0.0:
            raise ValueError(
                f"cross_section_fb of {self.name!r} is {self.cross_section_fb}; expected > 0"
            )
        if not 0.0 <= self.negative_weight_fraction < 0.5:
            raise ValueError(
                f"negative_weight_fraction of {self.name!r} is "
                f"{self.negative_weight_fraction}; expected [0, 0.5)"
            )
        if not (self.data_scale > 0.0 and math.isfinite(self.data_scale)):
            raise ValueError(
                f"data_scale of {self.name!r} is {self.data_scale}; expected a finite number > 0"
            )

    def expected_yield(self, lumi: float) -> float:
        """Expected number of skimmed events at integrated luminosity ``lumi`` (fb^-1)."""
        lumi = _check_lumi(lumi)
        return self.cross_section_fb * lumi

    def data_yield(self, lumi: float) -> float:
        """Mean number of this process's events in the pseudo-data: ``data_scale`` times
        :meth:`expected_yield`."""
        return self.data_scale * self.expected_yield(lumi)


SAMPLES: Mapping[str, SampleSpec] = types.MappingProxyType(
    {
        "signal": SampleSpec(
            name="signal",
            description="narrow 150 GeV scalar resonance (gluon fusion) decaying to mu+ mu-",
            fraction=0.15,
            cross_section_fb=0.085,
        ),
        "drell_yan": SampleSpec(
            name="drell_yan",
            description="Z/gamma* -> mu+ mu- (m > 50 GeV): Z peak plus falling continuum",
            fraction=0.25,
            cross_section_fb=9.0,
            data_scale=0.94,
        ),
        "ttbar": SampleSpec(
            name="ttbar",
            description="dileptonic ttbar -> b mu nu b mu nu at NLO, with negative weights",
            fraction=0.30,
            cross_section_fb=13.5,
            negative_weight_fraction=0.15,
            data_scale=1.10,
        ),
        "multijet": SampleSpec(
            name="multijet",
            description="QCD multijet with two soft non-isolated (non-prompt or fake) muons",
            fraction=0.30,
            cross_section_fb=18.0,
        ),
    }
)


# --------------------------------------------------------------------------------------------
# Event container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Events:
    """Generated events as padded 2-D arrays (row = event); invalid slots have ``*_ok`` False."""

    mu_pt: np.ndarray  # (n, 4) float64
    mu_eta: np.ndarray
    mu_phi: np.ndarray
    mu_charge: np.ndarray  # (n, 4) int32
    mu_iso: np.ndarray
    mu_ok: np.ndarray  # (n, 4) bool
    jet_pt: np.ndarray  # (n, 8) float64
    jet_eta: np.ndarray
    jet_btag: np.ndarray
    jet_ok: np.ndarray  # (n, 8) bool
    met_x: np.ndarray  # (n,) float64
    met_y: np.ndarray

    def __len__(self) -> int:
        return len(self.met_x)


def _concat_events(parts: list[_Events]) -> _Events:
    fields = [f.name for f in dataclasses.fields(_Events)]
    return _Events(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in fields})


def _take_events(ev: _Events, index: np.ndarray) -> _Events:
    fields = [f.name for f in dataclasses.fields(_Events)]
    return _Events(**{k: getattr(ev, k)[index] for k in fields})


# --------------------------------------------------------------------------------------------
# Physics building blocks (vectorised; rng is a numpy Generator)
# --------------------------------------------------------------------------------------------


def _breit_wigner_mass(
    rng: np.random.Generator, n: int, mass: float, width: float, lo: float, hi: float
) -> np.ndarray:
    """Relativistic Breit-Wigner masses in [lo, hi].

    Density in s = m^2: f(s) ~ 1 / ((s - M^2)^2 + M^2 Gamma^2), sampled exactly by inversion:
    s = M^2 + M Gamma tan(u), with u uniform between atan((lo^2 - M^2)/(M Gamma)) and
    atan((hi^2 - M^2)/(M Gamma)).
    """
    mg = mass * width
    u_lo = math.atan((lo * lo - mass * mass) / mg)
    u_hi = math.atan((hi * hi - mass * mass) / mg)
    s = mass * mass + mg * np.tan(rng.uniform(u_lo, u_hi, n))
    return np.sqrt(s)


def _power_law(rng: np.random.Generator, n: int, lo: float, index: float, hi: float = np.inf):
    """x in [lo, hi] with density ~ x^-index (index > 1), by inversion of the CDF."""
    a = 1.0 - index
    u = rng.uniform(0.0, 1.0, n)
    top = 0.0 if np.isinf(hi) else hi**a
    return (lo**a + u * (top - lo**a)) ** (1.0 / a)


def _muon_resolution(pt: np.ndarray) -> np.ndarray:
    """Relative muon pt resolution sigma(pt)/pt = 0.025 + 5e-5 pt/GeV (2.9% at 75 GeV).

    For a resonance decaying to two muons of similar pt the mass resolution is
    sigma_m/m ~ (sigma_pt/pt)/sqrt(2), i.e. ~2% at 150 GeV and ~1.9% at the Z.
    """
    return 0.025 + 5e-5 * pt


def _two_body_decay(
    rng: np.random.Generator,
    mass: np.ndarray,
    pt: np.ndarray,
    rapidity: np.ndarray,
    phi: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Isotropic decay of a parent (mass, pt, y, phi) into two massless muons.

    Parent four-momentum: m_T = sqrt(m^2 + pt^2), E = m_T cosh y, p_z = m_T sinh y. In the rest
    frame each muon has |p*| = m/2 along (cos(theta*) uniform in [-1, 1], phi* uniform); the lab
    momenta follow from the Lorentz boost with beta = p/E, gamma = E/m:
    p = p* + [gamma^2/(1+gamma) (beta . p*) + gamma E*] beta, E* = |p*| (writing
    (gamma-1)/beta^2 as gamma^2/(1+gamma) avoids 0/0 at rest).
    Returns (pt1, eta1, phi1, pt2, eta2, phi2).
    """
    n = len(mass)
    mt = np.sqrt(mass * mass + pt * pt)
    energy = mt * np.cosh(rapidity)
    bx = pt * np.cos(phi) / energy
    by = pt * np.sin(phi) / energy
    bz = mt * np.sinh(rapidity) / energy
    gamma = energy / mass
    cos_t = rng.uniform(-1.0, 1.0, n)
    sin_t = np.sqrt(1.0 - cos_t * cos_t)
    phi_star = rng.uniform(-np.pi, np.pi, n)
    q = 0.5 * mass
    qx, qy, qz = q * sin_t * np.cos(phi_star), q * sin_t * np.sin(phi_star), q * cos_t
    bq = bx * qx + by * qy + bz * qz
    g2 = gamma * gamma / (1.0 + gamma)
    out = []
    for sign in (1.0, -1.0):
        coef = g2 * sign * bq + gamma * q
        px, py, pz = sign * qx + coef * bx, sign * qy + coef * by, sign * qz + coef * bz
        ptl = np.hypot(px, py)
        out += [ptl, np.arcsinh(pz / ptl), np.arctan2(py, px)]
    return tuple(out)  # type: ignore[return-value]


def _skim(pt1: np.ndarray, eta1: np.ndarray, pt2: np.ndarray, eta2: np.ndarray) -> np.ndarray:
    """Dimuon skim on the two primary muons: |eta| < 2.4, pt_lead > 20 GeV, pt_sublead > 10."""
    return (
        (np.maximum(pt1, pt2) > _LEAD_PT_MIN)
        & (np.minimum(pt1, pt2) > _SUBLEAD_PT_MIN)
        & (np.abs(eta1) < _ETA_MAX)
        & (np.abs(eta2) < _ETA_MAX)
    )


def _accepted(
    rng: np.random.Generator,
    n: int,
    draw: Callable[[np.random.Generator, int], dict[str, np.ndarray]],
    efficiency: float,
) -> dict[str, np.ndarray]:
    """Exactly ``n`` candidates from ``draw`` that pass :func:`_skim` (rejection sampling).

    ``draw(rng, m)`` returns m candidates as arrays pt1, eta1, phi1, pt2, eta2, phi2 (+ extras);
    ``efficiency`` is a guess of the skim efficiency used to size the batches.
    """
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    while have < n:
        m = int((n - have) / efficiency * 1.05) + 64
        cand = draw(rng, m)
        ok = _skim(cand["pt1"], cand["eta1"], cand["pt2"], cand["eta2"])
        parts.append({k: v[ok] for k, v in cand.items()})
        have += int(ok.sum())
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def _resonance_draw(
    mass_sampler: Callable[[np.random.Generator, int], np.ndarray],
    pt_shape: float,
    pt_scale: float,
    y_sigma: float,
) -> Callable[[np.random.Generator, int], dict[str, np.ndarray]]:
    """Candidates for a resonance decaying to mu+ mu-, with detector smearing of the muon pt.

    Parent: mass from ``mass_sampler``, pt ~ Gamma(pt_shape, pt_scale), y ~ Normal(0, y_sigma),
    phi uniform; decay by :func:`_two_body_decay`; each muon pt is multiplied by
    (1 + sigma_rel(pt) z), z ~ Normal(0, 1), with sigma_rel from :func:`_muon_resolution`.
    """

    def draw(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
        mass = mass_sampler(rng, m)
        pt = rng.gamma(pt_shape, pt_scale, m)
        y = rng.normal(0.0, y_sigma, m)
        phi = rng.uniform(-np.pi, np.pi, m)
        pt1, eta1, phi1, pt2, eta2, phi2 = _two_body_decay(rng, mass, pt, y, phi)
        pt1 = pt1 * (1.0 + _muon_resolution(pt1) * rng.standard_normal(m))
        pt2 = pt2 * (1.0 + _muon_resolution(pt2) * rng.standard_normal(m))
        return {"pt1": pt1, "eta1": eta1, "phi1": phi1, "pt2": pt2, "eta2": eta2, "phi2": phi2}

    return draw


def _independent_draw(
    pt_sampler: Callable[[np.random.Generator, int], np.ndarray], eta_sigma: float
) -> Callable[[np.random.Generator, int], dict[str, np.ndarray]]:
    """Candidates with two independent muons: pt from ``pt_sampler``, eta ~ Normal(0, eta_sigma),
    phi uniform (no common parent, so the dimuon mass is broad)."""

    def draw(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
        out = {}
        for i in ("1", "2"):
            out["pt" + i] = pt_sampler(rng, m)
            out["eta" + i] = rng.normal(0.0, eta_sigma, m)
            out["phi" + i] = rng.uniform(-np.pi, np.pi, m)
        return out

    return draw


def _iso_prompt(rng: np.random.Generator, shape: tuple[int, ...], scale: float, p_busy: float):
    """Relative isolation of prompt muons: Exponential(scale), and with probability ``p_busy``
    Exponential(4 scale) (pile-up or nearby hadronic activity)."""
    busy = rng.uniform(size=shape) < p_busy
    return rng.exponential(1.0, shape) * np.where(busy, 4.0 * scale, scale)


def _iso_nonprompt(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Relative isolation of non-prompt muons (inside jets): Gamma(shape 2, scale 0.2), mean 0.4."""
    return rng.gamma(2.0, 0.2, shape)


def _muons(
    rng: np.random.Generator,
    prim: dict[str, np.ndarray],
    charge1: np.ndarray,
    charge2: np.ndarray,
    iso_primary: np.ndarray,
    p_extra: float,
) -> dict[str, np.ndarray]:
    """Padded (n, 4) muon arrays: the two primary muons plus 0-2 soft non-prompt extra muons.

    An extra muon appears with probability ``p_extra`` (a second one with probability 0.2 given
    one); extra muons have pt = 5 GeV x (power law, index 4), eta uniform in |eta| < 2.4, random
    charge and non-prompt isolation (:func:`_iso_nonprompt`).
    """
    n = len(charge1)
    k = _MAX_MUONS
    n_extra = (rng.uniform(size=n) < p_extra).astype(np.int64)
    n_extra += (n_extra == 1) & (rng.uniform(size=n) < 0.2)
    pt = np.empty((n, k))
    eta = np.empty((n, k))
    phi = np.empty((n, k))
    charge = np.empty((n, k), dtype=np.int32)
    pt[:, 0], pt[:, 1] = prim["pt1"], prim["pt2"]
    eta[:, 0], eta[:, 1] = prim["eta1"], prim["eta2"]
    phi[:, 0], phi[:, 1] = prim["phi1"], prim["phi2"]
    charge[:, 0], charge[:, 1] = charge1, charge2
    pt[:, 2:] = _power_law(rng, n * (k - 2), _EXTRA_PT_MIN, 4.0).reshape(n, k - 2)
    eta[:, 2:] = rng.uniform(-_ETA_MAX, _ETA_MAX, (n, k - 2))
    phi[:, 2:] = rng.uniform(-np.pi, np.pi, (n, k - 2))
    charge[:, 2:] = _random_charge(rng, (n, k - 2))
    iso = np.empty((n, k))
    iso[:, :2] = iso_primary
    iso[:, 2:] = _iso_nonprompt(rng, (n, k - 2))
    ok = np.arange(k)[None, :] < (2 + n_extra)[:, None]
    return {"pt": pt, "eta": eta, "phi": phi, "charge": charge, "iso": iso, "ok": ok}


def _random_charge(rng: np.random.Generator, shape) -> np.ndarray:
    return np.where(rng.uniform(size=shape) < 0.5, 1, -1).astype(np.int32)


def _jets(
    rng: np.random.Generator,
    n_light: np.ndarray,
    n_b: np.ndarray,
    light_pt_index: float,
    b_pt_shape: float,
    b_pt_scale: float,
) -> dict[str, np.ndarray]:
    """Padded (n, 8) jet arrays: up to 6 light jets and up to 2 b jets, before acceptance.

    Light jets: pt = 25 GeV x (power law with ``light_pt_index``), b-tag ~ Beta(1, 12)
    (mistag rate P(btag > 0.2) = 6.9%, P(btag > 0.5) = 0.02%). b jets: pt ~
    Gamma(b_pt_shape, b_pt_scale), b-tag ~ Beta(1.5, 1.5) (efficiency P(btag > 0.2) = 86%,
    P(btag > 0.5) = 50%, P(btag > 0.8) = 14%). eta ~ Normal(0, 1.4). A jet is reconstructed
    if pt > 25 GeV and |eta| < 2.4, so b jets are sometimes lost (as in a real detector).
    """
    n = len(n_light)
    jl, jb = _MAX_LIGHT_JETS, _MAX_JETS - _MAX_LIGHT_JETS
    pt = np.empty((n, _MAX_JETS))
    btag = np.empty((n, _MAX_JETS))
    pt[:, :jl] = _power_law(rng, n * jl, _JET_PT_MIN, light_pt_index).reshape(n, jl)
    pt[:, jl:] = rng.gamma(b_pt_shape, b_pt_scale, (n, jb))
    btag[:, :jl] = rng.beta(1.0, 12.0, (n, jl))
    btag[:, jl:] = rng.beta(1.5, 1.5, (n, jb))
    eta = rng.normal(0.0, 1.4, (n, _MAX_JETS))
    slot = np.arange(_MAX_JETS)[None, :]
    exists = np.where(
        slot < jl,
        slot < np.minimum(n_light, jl)[:, None],
        (slot - jl) < np.minimum(n_b, jb)[:, None],
    )
    ok = exists & (pt > _JET_PT_MIN) & (np.abs(eta) < _ETA_MAX)
    return {"pt": pt, "eta": eta, "btag": btag, "ok": ok}


def _met(
    rng: np.random.Generator,
    true_x: np.ndarray,
    true_y: np.ndarray,
    mu: dict[str, np.ndarray],
    jets: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Reconstructed missing transverse momentum vector (x, y) in GeV.

    MET = (true neutrino pt sum) + resolution, with Gaussian resolution per component
    sigma = 0.6 sqrt(sum E_T / GeV) GeV, sum E_T = sum(muon pt) + sum(jet pt) + 100 GeV
    (underlying event and pile-up): ~11 GeV for a signal event.
    """
    sum_et = (
        np.where(mu["ok"], mu["pt"], 0.0).sum(1) + np.where(jets["ok"], jets["pt"], 0.0).sum(1)
    ) + 100.0
    sigma = 0.6 * np.sqrt(sum_et)
    n = len(true_x)
    return true_x + sigma * rng.standard_normal(n), true_y + sigma * rng.standard_normal(n)


def _assemble(
    mu: dict[str, np.ndarray], jets: dict[str, np.ndarray], met: tuple[np.ndarray, np.ndarray]
) -> _Events:
    return _Events(
        mu_pt=mu["pt"],
        mu_eta=mu["eta"],
        mu_phi=mu["phi"],
        mu_charge=mu["charge"],
        mu_iso=mu["iso"],
        mu_ok=mu["ok"],
        jet_pt=jets["pt"],
        jet_eta=jets["eta"],
        jet_btag=jets["btag"],
        jet_ok=jets["ok"],
        met_x=met[0],
        met_y=met[1],
    )


# --------------------------------------------------------------------------------------------
# Process models
# --------------------------------------------------------------------------------------------


def _generate_signal(rng: np.random.Generator, n: int) -> _Events:
    """Narrow scalar resonance X -> mu+ mu-, produced in gluon fusion.

    - Mass: relativistic Breit-Wigner, M = 150 GeV, Gamma = 1 GeV, truncated to [130, 170] GeV;
      the reconstructed peak is dominated by the muon resolution (sigma_m/m ~ 2%, ~3 GeV).
    - Production: pt_X ~ Gamma(1.8, 14 GeV) (mean 25 GeV), y_X ~ Normal(0, 1.4), phi uniform.
    - Decay: isotropic in the rest frame (spin 0), boosted to the lab (:func:`_two_body_decay`).
    - Muons: opposite charge, isolated (iso ~ Exponential(0.015), 10% Exponential(0.06);
      P(iso < 0.15) = 99%); extra soft muon in 2% of events.
    - Jets: Poisson(0.8) light ISR jets (power law, index 3.5), no b jets.
    - MET: resolution only (no neutrinos).
    """
    mass = lambda r, m: _breit_wigner_mass(r, m, SIGNAL_MASS, SIGNAL_WIDTH, 130.0, 170.0)  # noqa: E731
    prim = _accepted(rng, n, _resonance_draw(mass, 1.8, 14.0, 1.4), efficiency=0.72)
    q = _random_charge(rng, n)
    mu = _muons(rng, prim, q, -q, _iso_prompt(rng, (n, 2), 0.015, 0.10), p_extra=0.02)
    jets = _jets(rng, rng.poisson(0.8, n), np.zeros(n, np.int64), 3.5, 3.0, 20.0)
    zero = np.zeros(n)
    return _assemble(mu, jets, _met(rng, zero, zero, mu, jets))


def _drell_yan_mass(rng: np.random.Generator, m: int) -> np.ndarray:
    """Z/gamma* mass in [50, 2000] GeV: with probability 0.88 a relativistic Breit-Wigner
    (M_Z = 91.19, Gamma_Z = 2.495 GeV), else a photon-like continuum dN/dm ~ m^-4."""
    continuum = rng.uniform(size=m) < 0.12
    bw = _breit_wigner_mass(rng, m, Z_MASS, Z_WIDTH, 50.0, 2000.0)
    cont = _power_law(rng, m, 50.0, 4.0, 2000.0)
    return np.where(continuum, cont, bw)


def _generate_drell_yan(rng: np.random.Generator, n: int) -> _Events:
    """Drell-Yan Z/gamma* -> mu+ mu- with m_mumu > 50 GeV (irreducible background).

    - Mass: Z Breit-Wigner (M = 91.19 GeV, Gamma = 2.495 GeV) plus a falling continuum
      dN/dm ~ m^-4 (12% of generated events), smeared by the muon resolution (~1.8 GeV at
      the Z); the continuum and the Breit-Wigner tail populate the signal region at 150 GeV.
    - Production: pt_Z ~ Gamma(1.4, 9 GeV) (mean 12.6 GeV), y ~ Normal(0, 1.8), phi uniform.
    - Decay: isotropic in the rest frame, boosted to the lab; opposite-charge isolated muons
      (as for the signal); extra soft muon in 3% of events.
    - Jets: Poisson(0.5) light jets (power law, index 3.5); a b jet in 3% of events (Z + b).
    - MET: resolution only.
    """
    prim = _accepted(rng, n, _resonance_draw(_drell_yan_mass, 1.4, 9.0, 1.8), efficiency=0.6)
    q = _random_charge(rng, n)
    mu = _muons(rng, prim, q, -q, _iso_prompt(rng, (n, 2), 0.015, 0.10), p_extra=0.03)
    n_b = (rng.uniform(size=n) < 0.03).astype(np.int64)
    jets = _jets(rng, rng.poisson(0.5, n), n_b, 3.5, 2.0, 25.0)
    zero = np.zeros(n)
    return _assemble(mu, jets, _met(rng, zero, zero, mu, jets))


def _generate_ttbar(rng: np.random.Generator, n: int) -> _Events:
    """Dileptonic ttbar -> (b mu+ nu)(b mu- nu).

    - Muons: from the two W decays, independent kinematics: pt ~ Gamma(2.2, 20 GeV)
      (mean 44 GeV), eta ~ Normal(0, 1.2), phi uniform, opposite charge; so the dimuon mass is
      broad (peaking near 60-100 GeV with a long tail). Isolation looser than Drell-Yan because
      of the nearby b jets: Exponential(0.03), 20% Exponential(0.12); extra soft muon from a
      semileptonic b decay in 12% of events.
    - Jets: two b jets, pt ~ Gamma(3, 22 GeV) (mean 66 GeV), b-tag ~ Beta(1.5, 1.5), each lost
      when outside pt > 25 GeV, |eta| < 2.4; plus Poisson(1.0) light ISR jets (index 3).
    - MET: two neutrinos, each pt ~ Gamma(2.2, 20 GeV) with uniform phi, plus resolution
      (mean MET ~ 65 GeV).
    """
    pt_w = lambda r, m: r.gamma(2.2, 20.0, m)  # noqa: E731
    prim = _accepted(rng, n, _independent_draw(pt_w, 1.2), efficiency=0.76)
    q = _random_charge(rng, n)
    mu = _muons(rng, prim, q, -q, _iso_prompt(rng, (n, 2), 0.03, 0.20), p_extra=0.12)
    jets = _jets(rng, rng.poisson(1.0, n), np.full(n, 2, np.int64), 3.0, 3.0, 22.0)
    nu_pt = rng.gamma(2.2, 20.0, (n, 2))
    nu_phi = rng.uniform(-np.pi, np.pi, (n, 2))
    true_x = (nu_pt * np.cos(nu_phi)).sum(1)
    true_y = (nu_pt * np.sin(nu_phi)).sum(1)
    return _assemble(mu, jets, _met(rng, true_x, true_y, mu, jets))


def _generate_multijet(rng: np.random.Generator, n: int) -> _Events:
    """QCD multijet events with two non-prompt (heavy-flavour decay) or fake muons.

    - Muons: independent, soft: pt = 12 GeV x (power law, index 3) (falling, so the dimuon
      mass spectrum falls with mass), eta ~ Normal(0, 1.5), phi uniform, charges independent
      (same-sign as often as opposite-sign); non-isolated: iso ~ Gamma(2, 0.07) (mean 0.14,
      ten times the prompt muons'; P(iso < 0.15) = 63%, P(iso < 0.05) = 16%); extra soft
      muon in 15% of events.
    - Jets: 2 + Poisson(1.5) light jets (power law, index 3); with probability 0.35 the event
      is b bbar-like and carries Binomial(2, 0.6) b jets (pt ~ Gamma(2, 25 GeV)).
    - MET: resolution, plus in 15% of events a mismeasured jet: an extra vector of length
      Exponential(25 GeV), uniform direction.
    """
    pt_fake = lambda r, m: _power_law(r, m, 12.0, 3.0)  # noqa: E731
    prim = _accepted(rng, n, _independent_draw(pt_fake, 1.5), efficiency=0.45)
    q1, q2 = _random_charge(rng, n), _random_charge(rng, n)
    mu = _muons(rng, prim, q1, q2, rng.gamma(2.0, 0.07, (n, 2)), p_extra=0.15)
    heavy = rng.uniform(size=n) < 0.35
    n_b = np.where(heavy, rng.binomial(2, 0.6, n), 0)
    jets = _jets(rng, 2 + rng.poisson(1.5, n), n_b, 3.0, 2.0, 25.0)
    mismeasured = rng.uniform(size=n) < 0.15
    fake_len = np.where(mismeasured, rng.exponential(25.0, n), 0.0)
    fake_phi = rng.uniform(-np.pi, np.pi, n)
    return _assemble(
        mu, jets, _met(rng, fake_len * np.cos(fake_phi), fake_len * np.sin(fake_phi), mu, jets)
    )


_GENERATORS: Mapping[str, Callable[[np.random.Generator, int], _Events]] = {
    "signal": _generate_signal,
    "drell_yan": _generate_drell_yan,
    "ttbar": _generate_ttbar,
    "multijet": _generate_multijet,
}


# --------------------------------------------------------------------------------------------
# From padded events to output arrays
# --------------------------------------------------------------------------------------------


def _jagged_sorted(
    key: np.ndarray, ok: np.ndarray, fields: Mapping[str, tuple[np.ndarray, type]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sort each row by ``key`` descending (invalid slots last) and flatten the valid slots.

    Returns (counts, {field: flat array cast to its dtype}).
    """
    order = np.argsort(np.where(ok, -key, np.inf), axis=1, kind="stable")
    ok_sorted = np.take_along_axis(ok, order, axis=1)
    flat = {
        name: np.take_along_axis(arr, order, axis=1)[ok_sorted].astype(dtype)
        for name, (arr, dtype) in fields.items()
    }
    return ok.sum(1).astype(np.int32), flat


def _nominal_columns(ev: _Events, first_event: int) -> dict[str, Any]:
    """Columns of the nominal tree: numpy arrays and flat jagged content (see module docstring).

    Stored values are float32; ``MET_pt``/``MET_phi`` come from the float64 MET vector.
    """
    n_mu, mu = _jagged_sorted(
        ev.mu_pt,
        ev.mu_ok,
        {
            "pt": (ev.mu_pt, np.float32),
            "eta": (ev.mu_eta, np.float32),
            "phi": (ev.mu_phi, np.float32),
            "charge": (ev.mu_charge, np.int32),
            "iso": (ev.mu_iso, np.float32),
        },
    )
    n_jet, jet = _jagged_sorted(
        ev.jet_pt,
        ev.jet_ok,
        {
            "pt": (ev.jet_pt, np.float32),
            "eta": (ev.jet_eta, np.float32),
            "btag": (ev.jet_btag, np.float32),
        },
    )
    return {
        "event": np.arange(first_event, first_event + len(ev), dtype=np.int64),
        "n_mu": n_mu,
        "mu": mu,
        "n_jet": n_jet,
        "jet": jet,
        "MET_pt": np.hypot(ev.met_x, ev.met_y).astype(np.float32),
        "MET_phi": np.arctan2(ev.met_y, ev.met_x).astype(np.float32),
    }


def _scale_muons(cols: dict[str, Any], direction: float) -> dict[str, Any]:
    """Columns with every muon pt scaled by (1 + direction * MUON_SCALE), MET recomputed.

    Computed from the stored (float32) nominal values in float64: pt' = pt (1 + d s), and
    MET' = MET - sum_mu (pt' - pt)(cos phi, sin phi) (the muons' extra transverse momentum is
    balanced by less missing momentum). Scaling by a constant keeps the pt order.
    """
    mu = cols["mu"]
    pt = mu["pt"].astype(np.float64)
    phi = mu["phi"].astype(np.float64)
    dpt = pt * (direction * MUON_SCALE)
    event_index = np.repeat(np.arange(len(cols["event"])), cols["n_mu"])
    n = len(cols["event"])
    dpx = np.bincount(event_index, weights=dpt * np.cos(phi), minlength=n)
    dpy = np.bincount(event_index, weights=dpt * np.sin(phi), minlength=n)
    met = cols["MET_pt"].astype(np.float64)
    met_phi = cols["MET_phi"].astype(np.float64)
    mex = met * np.cos(met_phi) - dpx
    mey = met * np.sin(met_phi) - dpy
    out = dict(cols)
    out["mu"] = dict(mu, pt=(pt + dpt).astype(np.float32))
    out["MET_pt"] = np.hypot(mex, mey).astype(np.float32)
    out["MET_phi"] = np.arctan2(mey, mex).astype(np.float32)
    return out


def _efficiency_uncertainty(cols: dict[str, Any]) -> np.ndarray:
    """Relative per-event muon-efficiency scale-factor uncertainty.

    delta = 0.01 + 0.02 exp(-pt_sub / 30 GeV), pt_sub the nominal sub-leading muon pt:
    1% for hard muons, up to ~1.7% at the 10 GeV skim threshold (soft-muon efficiencies are
    known less well). weight_up/down = weight (1 +- delta).
    """
    first = np.concatenate([[0], np.cumsum(cols["n_mu"])[:-1]])
    pt_sub = cols["mu"]["pt"][first + 1].astype(np.float64)
    return 0.01 + 0.02 * np.exp(-pt_sub / 30.0)


def _to_uproot(cols: dict[str, Any], weights: dict[str, np.ndarray] | None) -> dict:
    """Arrays for ``WritableTree.extend``: records of jagged arrays give nMuon/Muon_* etc."""
    muon = ak.zip({k: ak.unflatten(v, cols["n_mu"]) for k, v in cols["mu"].items()})
    jet = ak.zip({k: ak.unflatten(v, cols["n_jet"]) for k, v in cols["jet"].items()})
    out = {"event": cols["event"], "Muon": muon, "Jet": jet}
    out["MET_pt"] = cols["MET_pt"]
    out["MET_phi"] = cols["MET_phi"]
    if weights is not None:
        out.update(weights)
    return out


def _branch_types(with_weights: bool) -> dict:
    """Branch types for ``mktree`` (taken from an empty chunk, so they match ``extend``)."""
    f32, i32 = np.zeros(0, np.float32), np.zeros(0, np.int32)
    cols = {
        "event": np.zeros(0, np.int64),
        "n_mu": i32,
        "mu": {"pt": f32, "eta": f32, "phi": f32, "charge": i32, "iso": f32},
        "n_jet": i32,
        "jet": {"pt": f32, "eta": f32, "btag": f32},
        "MET_pt": f32,
        "MET_phi": f32,
    }
    w = np.zeros(0, np.float64)
    weights = {"weight": w, "weight_up": w, "weight_down": w} if with_weights else None
    arrays = _to_uproot(cols, weights)
    return {k: (v.type if isinstance(v, ak.Array) else v.dtype) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _check_lumi(lumi: float) -> float:
    try:
        value = float(lumi)
    except (TypeError, ValueError):
        raise ValueError(f"lumi must be a positive number of fb^-1, got {lumi!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"lumi must be a positive finite number of fb^-1, got {lumi!r}")
    return value


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _rng(seed: int, name: str, purpose: int) -> np.random.Generator:
    """Independent stream per (seed, sample name, purpose); crc32 keeps the key stable."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(zlib.crc32(name.encode()), purpose))
    )


def _allocate(events: int) -> dict[str, int]:
    """Split ``events`` over the samples by ``fraction`` (largest remainder), at least 1 each."""
    names = list(SAMPLES)
    total = sum(SAMPLES[k].fraction for k in names)
    exact = [events * SAMPLES[k].fraction / total for k in names]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: events - sum(counts)]:
        counts[i] += 1
    return {k: max(1, c) for k, c in zip(names, counts, strict=True)}


def _chunks(total: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, chunk_size):
        yield start, min(chunk_size, total - start)


def _n_negative(n: int, fraction: float) -> int:
    """Negative-weight events in a chunk of n: round(fraction * n), halves rounded up."""
    return math.floor(fraction * n + 0.5)


class _AtomicRootFile:
    """``uproot.recreate`` on a temporary name in the target directory, renamed on success."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self):
        self.file = uproot.recreate(self.tmp, compression=_COMPRESSION)
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.close()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _write_sample(
    path: pathlib.Path, spec: SampleSpec, n_events: int, seed: int, lumi: float, chunk_size: int
) -> None:
    """Write one Monte Carlo sample: nominal and muon-scale trees, ``n_events`` events.

    Weights: w_i = s_i Y / (N - 2 N_neg) with s_i = -1 for exactly N_neg events (chosen at random
    within each chunk, round(f n_chunk) per chunk) and +1 otherwise, so sum_i w_i = Y.
    """
    rng = _rng(seed, spec.name, _PURPOSE_MC)
    generate_events = _GENERATORS[spec.name]
    chunks = list(_chunks(n_events, chunk_size))
    n_neg_total = sum(_n_negative(n, spec.negative_weight_fraction) for _, n in chunks)
    y = spec.expected_yield(lumi)
    w_abs = y / (n_events - 2 * n_neg_total)
    types_ = _branch_types(with_weights=True)
    with _AtomicRootFile(path) as f:
        trees = {name: f.mktree(name, types_) for name in (_TREE_NOMINAL, *_TREE_VARIATIONS)}
        for start, n in chunks:
            ev = generate_events(rng, n)
            sign = np.ones(n)
            n_neg = _n_negative(n, spec.negative_weight_fraction)
            if n_neg:
                sign[rng.choice(n, size=n_neg, replace=False)] = -1.0
            cols = _nominal_columns(ev, start)
            del ev
            weight = sign * w_abs
            delta = _efficiency_uncertainty(cols)
            weights = {
                "weight": weight,
                "weight_up": weight * (1.0 + delta),
                "weight_down": weight * (1.0 - delta),
            }
            trees[_TREE_NOMINAL].extend(_to_uproot(cols, weights))
            for name, direction in _TREE_VARIATIONS.items():
                trees[name].extend(_to_uproot(_scale_muons(cols, direction), weights))
    log.info("wrote %s: %d events, expected yield %.6g", path, n_events, y)


def _write_data(path: pathlib.Path, seed: int, lumi: float, chunk_size: int) -> int:
    """Pseudo-data: Poisson(data_scale_s Y_s) unweighted events per sample s
    (:meth:`SampleSpec.data_yield`), concatenated and shuffled.

    Each sample's events come from its own data stream (independent of its Monte Carlo). The
    shuffle is realised without holding all events: a random permutation of the sample labels
    (one byte per event) fixes which sample fills each position, and each chunk of positions is
    filled with fresh events of the right samples. Returns the number of events.
    """
    names = list(SAMPLES)
    rngs = {k: _rng(seed, k, _PURPOSE_DATA) for k in names}
    counts = [int(rngs[k].poisson(SAMPLES[k].data_yield(lumi))) for k in names]
    order_rng = _rng(seed, _DATA_NAME, _PURPOSE_DATA_ORDER)
    labels = np.repeat(np.arange(len(names), dtype=np.int8), counts)
    order_rng.shuffle(labels)
    total = len(labels)
    with _AtomicRootFile(path) as f:
        tree = f.mktree(_TREE_NOMINAL, _branch_types(with_weights=False))
        for start, n in _chunks(total, chunk_size):
            chunk_labels = labels[start : start + n]
            parts = []
            for i, k in enumerate(names):
                n_k = int((chunk_labels == i).sum())
                if n_k:
                    parts.append(_GENERATORS[k](rngs[k], n_k))
            ev = _concat_events(parts)
            by_sample = np.argsort(chunk_labels, kind="stable")  # positions in sample order
            ev = _take_events(ev, np.argsort(by_sample, kind="stable"))
            tree.extend(_to_uproot(_nominal_columns(ev, start), None))
    log.info("wrote %s: %d pseudo-data events (counts per sample %s)", path, total, counts)
    return total


def generate(
    out_dir: str | os.PathLike,
    *,
    events: int = 200_000,
    seed: int = 1,
    lumi: float = LUMINOSITY_FB,
    chunk_size: int = 250_000,
) -> list[pathlib.Path]:
    """Generate the Monte Carlo samples and pseudo-data of the dimuon resonance search.

    Parameters
    ----------
    out_dir
        Directory for the ROOT files (created if missing).
    events
        Total number of Monte Carlo events, shared by the samples according to
        ``SampleSpec.fraction`` (largest-remainder rounding; at least one event per sample).
    seed
        Non-negative integer seed of all random streams.
    lumi
        Integrated luminosity in fb^-1: Monte Carlo weights sum to ``expected_yield(lumi)`` per
        sample and pseudo-data has Poisson(``data_yield(lumi)``) events per sample.
    chunk_size
        Events generated and written at a time (bounds the memory).

    Returns
    -------
    list of pathlib.Path
        ``signal.root``, ``drell_yan.root``, ``ttbar.root``, ``multijet.root``, ``data.root``,
        in that order. Each file is written under a temporary name and renamed when complete.
    """
    events = _check_count("events", events)
    chunk_size = _check_count("chunk_size", chunk_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    lumi = _check_lumi(lumi)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in _allocate(events).items():
        path = out / f"{name}.root"
        _write_sample(path, SAMPLES[name], n, int(seed), lumi, chunk_size)
        paths.append(path)
    data_path = out / f"{_DATA_NAME}.root"
    _write_data(data_path, int(seed), lumi, chunk_size)
    paths.append(data_path)
    return paths
