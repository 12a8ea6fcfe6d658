"""Statistical inference on a HistFactory model: test statistics, asymptotic CLs, discovery
significance, upper limits, likelihood scans, ranking, goodness of fit and toys.

Conventions are pyhf's (0.7.6) and, for the result records, cabinetry's. The modules follow
pyhf's ``infer`` package, and every name they export is importable from here
(``inference.hypotest(...)``):

- :mod:`~analysis.inference.mle`: batched maximum-likelihood fits, free and with the POI fixed;
- :mod:`~analysis.inference.test_statistics`: q_mu, q~_mu and q0 from those fits;
- :mod:`~analysis.inference.calculators`: asymptotic and toy-based hypothesis tests (CLs),
  the discovery significance;
- :mod:`~analysis.inference.intervals`: upper limits on the POI;
- :mod:`~analysis.inference.profile`: likelihood scans, the POI uncertainty, the ranking of
  nuisance parameters, goodness of fit;
- :mod:`~analysis.inference.diagnostics`: why a likelihood is not finite at a start point, and
  the global fit (MIGRAD checked against the batched Newton minimum);
- :mod:`~analysis.inference.results`: every result record, with ``to_dict``/``from_dict``;
- :mod:`~analysis.inference.utils`: :class:`InferenceError`, :func:`require_poi`.

All fits here are the batched torch Newton fits of :mod:`analysis.fit`: the many fits that a
hypotest, a limit, a scan or a set of toys needs run as one batched call. Everything stays in
torch on the model's device; results are small frozen records.
"""

from __future__ import annotations

from analysis.inference.calculators import (
    BAND_NSIGMA,
    AsymptoticCalculator,
    asimov_data,
    asymptotic_cls,
    hypotest,
    normal_cdf,
    significance,
    toy_hypotest,
)
from analysis.inference.diagnostics import DIFFERENT_MINIMUM, check_start, global_fit
from analysis.inference.intervals import (
    CURVE_POINTS,
    GRID_POINTS,
    LIMIT_CURVES,
    upper_limit,
    upper_limit_with_curve,
    upper_limits,
)
from analysis.inference.mle import (
    FIRST_PASS_ITERATIONS,
    KINK_STARTS,
    fixed_poi_fit,
    free_fit,
    minimize,
)
from analysis.inference.profile import (
    goodness_of_fit,
    poi_uncertainty,
    poisson_logpdf,
    ranking,
    scan,
)
from analysis.inference.results import (
    GoodnessOfFit,
    HypotestResult,
    LimitResult,
    RankingResult,
    ScanResult,
    SignificanceResult,
)
from analysis.inference.test_statistics import TestStat, statistic_from_fits, test_statistic
from analysis.inference.utils import InferenceError, require_poi

__all__ = [
    "BAND_NSIGMA",
    "CURVE_POINTS",
    "DIFFERENT_MINIMUM",
    "FIRST_PASS_ITERATIONS",
    "GRID_POINTS",
    "KINK_STARTS",
    "LIMIT_CURVES",
    "AsymptoticCalculator",
    "GoodnessOfFit",
    "HypotestResult",
    "InferenceError",
    "LimitResult",
    "RankingResult",
    "ScanResult",
    "SignificanceResult",
    "TestStat",
    "asimov_data",
    "asymptotic_cls",
    "check_start",
    "fixed_poi_fit",
    "free_fit",
    "global_fit",
    "goodness_of_fit",
    "hypotest",
    "minimize",
    "normal_cdf",
    "poi_uncertainty",
    "poisson_logpdf",
    "ranking",
    "require_poi",
    "scan",
    "significance",
    "statistic_from_fits",
    "test_statistic",
    "toy_hypotest",
    "upper_limit",
    "upper_limit_with_curve",
    "upper_limits",
]
