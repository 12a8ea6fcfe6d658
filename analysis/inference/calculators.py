"""Hypothesis tests: asymptotic CLs, toy-based CLs and the discovery significance (pyhf's
``infer.calculators`` and ``infer.hypotest``).

Asymptotics (Cowan, Cranmer, Gross, Vitells, arXiv:1007.1727, Wald approximation, sec. 3): the
Asimov dataset is the model's expectation at the parameters fitted to the *observed* data with
the POI fixed at 0 (at 1 for q0), as pyhf does. With ``s = sqrt(q)`` and ``s_A = sqrt(q_A)`` the
test statistic in ``-mu_hat/sigma`` space is ``t = s - s_A`` (q, q0), and for q~
``t = s - s_A`` if ``s <= s_A`` else ``(q - q_A) / (2 s_A)`` (eq. 65-66). Then
``CLs+b = Phi(-(t + s_A))``, ``CLb = Phi(-t)``, ``CLs = CLs+b / CLb``; the expected band uses
``t = n`` for ``n = 2, 1, 0, -1, -2`` (pyhf's order, i.e. CLs from the -2 sigma to the +2 sigma
band). For q0 the p-value is CLs+b.

Toys (:func:`toy_hypotest`): pyhf's ToyCalculator semantics, every toy fitted in batched calls.
"""

from __future__ import annotations

from typing import cast

import torch

from analysis.errors import ConfigError
from analysis.inference.mle import fixed_poi_fit, free_fit, minimize
from analysis.inference.results import HypotestResult, SignificanceResult
from analysis.inference.test_statistics import TestStat, statistic_from_fits, test_statistic
from analysis.inference.utils import _settings, require_poi
from analysis.likelihood._tensors import broadcast_shapes
from analysis.numpy_backend.infer import BAND_NSIGMA  # one definition for both engines
from analysis.progress import progress_bar


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), the standard normal CDF, accurate in both tails: ``exp(log_ndtr(x))``.

    ``torch.special.ndtr`` itself rounds to 0 below x = -8.3 (Phi(-11.2) = 1.8e-29 came out
    as 0), where ``log_ndtr`` keeps full relative precision down to the smallest doubles
    (x = -38.5); above 0 both agree to the last bit.
    """
    return torch.exp(torch.special.log_ndtr(x))


def asimov_data(
    model, data, asimov_poi: float, *, init=None, bounds=None, fixed=None
) -> torch.Tensor:
    """pyhf's Asimov dataset: expected data at the fit to ``data`` with the POI fixed."""
    pars, _ = fixed_poi_fit(model, data, asimov_poi, init=init, bounds=bounds, fixed=fixed)
    return model.expected_data(pars)


def asymptotic_cls(sqrt_q: torch.Tensor, sqrt_q_asimov: torch.Tensor, test_stat: TestStat):
    """(CLs+b, CLb, CLs) and the expected (..., 5) CLs+b and CLs from the Wald approximation."""
    if test_stat == "qtilde":
        safe = torch.where(sqrt_q_asimov > 0, sqrt_q_asimov, torch.ones_like(sqrt_q_asimov))
        t = torch.where(
            sqrt_q <= sqrt_q_asimov,
            sqrt_q - sqrt_q_asimov,
            (sqrt_q**2 - sqrt_q_asimov**2) / (2 * safe),
        )
    else:
        t = sqrt_q - sqrt_q_asimov
    clsb, clb = normal_cdf(-(t + sqrt_q_asimov)), normal_cdf(-t)
    n = torch.tensor(BAND_NSIGMA, dtype=t.dtype, device=t.device)
    clsb_exp = normal_cdf(-(n + sqrt_q_asimov.unsqueeze(-1)))
    clb_exp = normal_cdf(-n).expand_as(clsb_exp)
    return clsb, clb, clsb / clb, clsb_exp, clsb_exp / clb_exp


class AsymptoticCalculator:
    """Asymptotic hypothesis tests of one model and dataset at any POI values (pyhf's name);
    :func:`hypotest`, :func:`significance` and the limits all go through it.

    Fits: the free fit to the data, the fit that defines the Asimov dataset (POI fixed at 0, or
    at 1 for q0), the free fit to the Asimov data, and per tested value the fixed-POI fits to
    the data and to the Asimov data. Only the last two depend on the tested value; the others
    are done once, on the first :meth:`hypotest`: one batched call on the data from ``init``
    (free and Asimov-defining rows), then one call with the free fit to the Asimov data and that
    test's fixed-POI fits. Later calls are one batched call, the fixed-POI fits to both datasets
    at every tested value at once.

    Starts: every fit starts at ``init`` (pyhf's), the fixed-POI fits with the POI set to the
    tested value, except the free fit to the Asimov data, which starts at the parameters that
    made the Asimov data (their exact minimum: every Poisson and constraint term is at its
    maximum there). Every tested value thus starts from the same point (where the likelihood
    has several minima, the start picks one, and a limit that brackets on one call's values
    and refines on later ones must see one function of mu). Starting the fixed-POI fits at the
    free fit would halve their Newton iterations on ANA-SUSY-2018-16 but walks into the other
    minimum of the coupled-histosys validation workspaces. (A yield-batched model, whose fits
    must keep exactly its own batch, takes its fits in separate calls.)
    """

    def __init__(
        self, model, data, test_stat: TestStat = "qtilde", *, init=None, bounds=None, fixed=None
    ) -> None:
        if test_stat not in ("q", "qtilde", "q0"):
            raise ConfigError(f"unknown test statistic '{test_stat}'; expected q, qtilde or q0")
        self.model, self.test_stat = model, test_stat
        self.poi = require_poi(model)
        self.init, self.bounds, self.fixed = _settings(model, init, bounds, fixed)
        self.data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
        self.asimov_poi = 1.0 if test_stat == "q0" else 0.0
        self._fits: tuple | None = None  # (free fit, Asimov data, free fit to the Asimov data)
        self._fits_with_grad = False

    @property
    def free(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The free fit to the data: (parameters, twice NLL)."""
        return self._poi_independent_fits()[0]

    @property
    def asimov(self) -> torch.Tensor:
        """The Asimov dataset (main and auxiliary data)."""
        return self._poi_independent_fits()[1]

    @property
    def free_asimov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The free fit to the Asimov data."""
        return self._poi_independent_fits()[2]

    def _poi_independent_fits(self) -> tuple:
        if self._fits is None or self._stale():
            model = self.model
            kwargs = {"init": self.init, "bounds": self.bounds, "fixed": self.fixed}
            if model.nominal_batch > 1:  # a batched model takes exactly its own batch of fits
                free = free_fit(model, self.data, **kwargs)
                asimov = asimov_data(model, self.data, self.asimov_poi, **kwargs)
                self._fits = (free, asimov, free_fit(model, asimov, **kwargs))
                self._fits_with_grad = torch.is_grad_enabled()
            else:
                self._fused_fits(self.init.new_zeros((0,)))
        assert self._fits is not None
        return self._fits

    def _fused_fits(self, mus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The POI-independent fits together with the fixed-POI fits at ``mus`` (1-D; any
        number for one dataset, none for batched data), in two batched calls; returns the
        twice NLL of the fixed-POI fits to the data and to the Asimov data,
        ``(len(mus), *batch)`` each (every tested value for every dataset)."""
        model, poi = self.model, self.poi
        batch = self.data.shape[:-1]
        n = mus.numel()
        values = mus.reshape(-1, *([1] * len(batch))).expand(n, *batch)
        # the data: the free fit, the fit that defines the Asimov data, the fixed-POI fits
        start = self.init.expand(2 + n, *batch, model.npars).clone()
        start[1, ..., poi] = self.asimov_poi
        start[2:, ..., poi] = values
        fixed = self.fixed.expand(2 + n, *([1] * len(batch)), model.npars).clone()
        fixed[1:, ..., poi] = True
        x, nll = minimize(model, self.data, start, bounds=self.bounds, fixed=fixed, what="fit")
        asimov = model.expected_data(x[1])
        # the Asimov data: its free fit, from its own minimum at the Asimov POI value (the
        # parameters that made it), and the fixed-POI fits
        own = torch.minimum(torch.maximum(x[1].detach(), self.bounds[:, 0]), self.bounds[:, 1])
        start = self.init.expand(1 + n, *batch, model.npars).clone()
        start[0] = own
        start[1:, ..., poi] = values
        fixed = self.fixed.expand(1 + n, *([1] * len(batch)), model.npars).clone()
        fixed[1:, ..., poi] = True
        x_a, nll_a = minimize(model, asimov, start, bounds=self.bounds, fixed=fixed, what="fit")
        self._fits = ((x[0], nll[0]), asimov, (x_a[0], nll_a[0]))
        self._fits_with_grad = torch.is_grad_enabled()
        return nll[2:], nll_a[1:]

    def _datasets(self, asimov: torch.Tensor, shape, asimov_shape=None) -> torch.Tensor:
        """The data expanded to ``shape`` (n, *batch), then the Asimov data to
        ``asimov_shape`` (default ``shape``): ``(n + m, *batch, N)``."""
        asimov_shape = shape if asimov_shape is None else asimov_shape
        return torch.cat(
            [
                self.data.expand(*shape, self.data.shape[-1]),
                asimov.expand(*asimov_shape, asimov.shape[-1]),
            ]
        )

    def _fixed_poi_starts(self, values: torch.Tensor, asimov_values=None) -> torch.Tensor:
        """Starts of the fixed-POI fits to the data at ``values`` (n, *batch), then to the
        Asimov data at ``asimov_values`` (default ``values``): ``init`` with the POI replaced,
        ``(n + m, *batch, P)``."""
        asimov_values = values if asimov_values is None else asimov_values
        mus = torch.cat([values, asimov_values])
        start = self.init.expand(*mus.shape, self.model.npars).clone()
        start[..., self.poi] = mus
        return start

    def _stale(self) -> bool:
        """Whether the cached fits were made without grad mode and gradients are wanted now
        (a limit brackets its roots under ``no_grad``, then differentiates at them)."""
        return torch.is_grad_enabled() and not self._fits_with_grad

    def hypotest(self, poi_value) -> HypotestResult:
        """CLs (or the q0 p-value) at ``poi_value``: a number or a 1-D tensor of values (or any
        shape that broadcasts with the data's batch)."""
        model, poi = self.model, self.poi
        poi_value = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
        if model.nominal_batch > 1:  # one call per dataset: the batch must stay the model's
            kwargs = {"bounds": self.bounds, "fixed": self.fixed}
            q, q_asimov = (
                test_statistic(model, d, poi_value, self.test_stat, free=f, **kwargs)
                for d, f in ((self.data, self.free), (self.asimov, self.free_asimov))
            )
            return self._result(poi_value, q, q_asimov)
        batch = broadcast_shapes(self.data.shape[:-1], poi_value.shape)
        fused = self.data.dim() == 1 and poi_value.dim() <= 1 and not poi_value.requires_grad
        if (self._fits is None or self._stale()) and fused:
            nll = torch.stack(self._fused_fits(poi_value.reshape(-1))).reshape(2, *batch)
        else:
            data = self._datasets(self.asimov, (1, *batch))
            mu = poi_value.expand(batch).detach().unsqueeze(0)
            start = self._fixed_poi_starts(mu)
            fixed = self.fixed.clone()
            fixed[poi] = True
            x, nll = minimize(model, data, start, bounds=self.bounds, fixed=fixed, what="fit")
            if poi_value.requires_grad:  # the POI column carries the tested value's gradient
                is_poi = torch.arange(model.npars, device=x.device) == poi
                x = torch.where(is_poi, poi_value.expand(batch).unsqueeze(-1), x)
                nll = model.twice_nll(x, data)
        free_x = torch.stack([f[0].expand(*batch, model.npars) for f in self._free_fits])
        free_nll = torch.stack([f[1].expand(batch) for f in self._free_fits])
        mu = poi_value.expand(batch)
        q_pair = statistic_from_fits(nll, free_nll, free_x[..., poi].detach(), mu, self.test_stat)
        return self._result(poi_value, q_pair[0], q_pair[1])

    @property
    def _free_fits(self) -> tuple:
        return self.free, self.free_asimov

    def limit_cls(self, poi_value: torch.Tensor) -> torch.Tensor:
        """CLs of the six limit curves, each at its own POI value (6,): the observed CLs at
        ``poi_value[0]``, the expected band's -2 .. +2 sigma entries at ``poi_value[1:]``.

        The expected entries need only the fits to the Asimov data, so the six values take
        seven fixed-POI fits (the data at the first value, the Asimov data at all six) in one
        batched call, where :meth:`hypotest` at six values fits both datasets at each (twelve).
        The fits are those of :meth:`hypotest` (same starts, same settings): the numbers agree
        with ``hypotest(poi_value)``'s diagonal to the fits' rounding. A yield-batched model,
        batched data or a value that requires grad go through :meth:`hypotest`.
        """
        model, poi = self.model, self.poi
        poi_value = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
        six = (torch.arange(1, 6), torch.arange(5))
        if model.nominal_batch > 1 or self.data.dim() != 1 or poi_value.requires_grad:
            result = self.hypotest(poi_value)
            return torch.cat([result.cls_obs[:1], result.cls_exp[six]])
        (free_x, free_nll), (free_x_a, free_nll_a) = self._free_fits
        data = self._datasets(self.asimov, (1,), poi_value.shape)
        start = self._fixed_poi_starts(poi_value[:1], poi_value)
        fixed = self.fixed.clone()
        fixed[poi] = True
        _, nll = minimize(
            model,
            data,
            start,
            bounds=self.bounds,
            fixed=fixed,
            what="fit",
            parameters_gradient=False,
        )
        q = statistic_from_fits(nll[:1], free_nll, free_x[poi], poi_value[:1], self.test_stat)
        q_asimov = statistic_from_fits(
            nll[1:], free_nll_a, free_x_a[poi], poi_value, self.test_stat
        )
        result = self._result(poi_value, torch.cat([q, q_asimov[1:]]), q_asimov)
        return torch.cat([result.cls_obs[:1], result.cls_exp[six]])

    def _result(self, poi_value, q, q_asimov) -> HypotestResult:
        clsb, clb, cls, clsb_exp, cls_exp = asymptotic_cls(
            torch.sqrt(q), torch.sqrt(q_asimov), self.test_stat
        )
        if self.test_stat == "q0":
            cls, cls_exp = clsb, clsb_exp
        return HypotestResult(poi_value, self.test_stat, q, cls, cls_exp, clsb, clb, q_asimov)


def hypotest(
    model, data, poi_value, test_stat: TestStat = "qtilde", *, init=None, bounds=None, fixed=None
) -> HypotestResult:
    """Asymptotic hypothesis test(s) at ``poi_value`` (a number or a 1-D tensor of values):
    :meth:`AsymptoticCalculator.hypotest` (for one dataset the seven kinds of fit run as two
    batched calls), the one path of every asymptotic test."""
    calculator = AsymptoticCalculator(model, data, test_stat, init=init, bounds=bounds, fixed=fixed)
    return calculator.hypotest(poi_value)


def toy_hypotest(
    model,
    data,
    poi_value: float,
    test_stat: TestStat = "qtilde",
    *,
    n_toys: int = 2000,
    seed: int = 0,
    init=None,
    bounds=None,
    fixed=None,
    batch_size: int = 1000,
    progress: bool = False,
) -> HypotestResult:
    """Hypothesis test at ``poi_value`` with pseudo-experiments instead of asymptotics.

    pyhf's ToyCalculator semantics: toys are drawn (:meth:`Model.sample`) at the fits to the
    data with the POI fixed at ``poi_value`` (signal + background) and at 0 (background only;
    for q0 the roles are mu = 0 and mu = 1), every toy's test statistic at ``poi_value`` comes
    from one batched free fit and one batched fixed-POI fit of all toys, and
    ``CLs+b = P(q >= q_obs | s+b)``, ``CLb = P(q >= q_obs | b)``, ``CLs = CLs+b / CLb``. The
    expected band is the 2.3, 15.9, 50, 84.1 and 97.7 percentiles of CLs (CLs+b for q0)
    evaluated at each background-only toy (linear interpolation, as pyhf).

    The toys are fitted ``batch_size`` at a time (both hypotheses in each batched call; fits
    are independent per toy, so the batch size changes nothing but memory and the steps of
    the ``progress`` bar, shown on a terminal).
    """
    kwargs = {"init": init, "bounds": bounds, "fixed": fixed}
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        q_obs = test_statistic(model, data, poi_value, test_stat, **kwargs)
        other = 1.0 if test_stat == "q0" else 0.0
        pars_sb, _ = fixed_poi_fit(model, data, poi_value, **kwargs)
        pars_b, _ = fixed_poi_fit(model, data, other, **kwargs)
        toys = model.sample(torch.stack([pars_sb, pars_b]), n_toys, generator=generator)
        bar = progress_bar(n_toys, "toys", enabled=progress, unit="toy")
        try:
            batches = []
            for batch in torch.split(toys, max(1, int(batch_size))):
                batches.append(test_statistic(model, batch, poi_value, test_stat, **kwargs))
                bar.update(batch.shape[0])
        finally:
            bar.close()
        q_toys = torch.cat(batches)  # (n_toys, 2)
        q_sb, q_b = q_toys[:, 0], q_toys[:, 1]

        def pvalues(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            clsb = (q_sb.unsqueeze(-1) >= q.reshape(1, -1)).to(q.dtype).mean(0)
            clb = (q_b.unsqueeze(-1) >= q.reshape(1, -1)).to(q.dtype).mean(0)
            return clsb.reshape(q.shape), clb.reshape(q.shape)

        clsb, clb = pvalues(q_obs)
        clsb_toys, clb_toys = pvalues(q_b)  # p-values at every background-only toy
        levels = normal_cdf(-torch.tensor(BAND_NSIGMA, dtype=q_obs.dtype, device=q_obs.device))
        band = clsb_toys if test_stat == "q0" else clsb_toys / clb_toys
        cls_exp = torch.quantile(band, levels)
    cls = clsb if test_stat == "q0" else clsb / clb
    poi = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
    return HypotestResult(poi, test_stat, q_obs, cls, cls_exp, clsb, clb)


def significance(model, data, *, init=None, bounds=None, fixed=None) -> SignificanceResult:
    """Discovery significance and p-value from q0: observed, and median expected for mu = 1.

    ``Z = sqrt(q0)`` on the data and ``Z_A = sqrt(q0_A)`` on the Asimov data with mu = 1
    (Cowan, Cranmer, Gross, Vitells, Eur. Phys. J. C 71 (2011) 1554, eqs. 53 and 57), and
    ``p = Phi(-Z)`` (:func:`normal_cdf`): Z stays finite and exact however large it is (a
    p-value below 1e-308 is reported as 0, the significance still as sqrt(q0)); inverting a
    p-value that has rounded to 0 would give an infinite Z.
    """
    result = hypotest(model, data, 0.0, "q0", init=init, bounds=bounds, fixed=fixed)
    z_obs = torch.sqrt(result.teststat.clamp_min(0.0))
    # hypotest (asymptotic) always sets teststat_asimov
    z_exp = torch.sqrt(cast(torch.Tensor, result.teststat_asimov).clamp_min(0.0))
    return SignificanceResult(
        float(normal_cdf(-z_obs)), float(z_obs), float(normal_cdf(-z_exp)), float(z_exp)
    )
