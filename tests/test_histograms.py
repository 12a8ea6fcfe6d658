"""Hard histograms against hist (boost-histogram) and numpy."""

from __future__ import annotations

import hist
import numpy as np
import pytest
import torch

from analysis import config as configuration
from analysis.histograms import hard_cut_mask, hard_histogram, hard_histograms
from analysis.io import read_events


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_histogram_equals_hist(dtype):
    rng = np.random.default_rng(3)
    edges = np.array([-2.0, -1.0, -0.25, 0.0, 0.5, 2.0])
    values = np.concatenate([rng.normal(0, 1.2, 5000), edges, [np.nan, -5.0, 7.0]])
    weights = rng.normal(1.0, 0.5, values.size)
    reference = hist.Hist(hist.axis.Variable(edges), storage=hist.storage.Weight())
    reference.fill(values, weight=weights)
    got = hard_histogram(
        torch.tensor(values, dtype=dtype),
        torch.tensor(weights, dtype=dtype),
        torch.tensor(edges, dtype=dtype),
    )
    assert got.yields.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got.yields.numpy(), reference.values(), rtol=rtol)
    np.testing.assert_allclose(got.sumw2.numpy(), reference.variances(), rtol=rtol)


def test_hard_histograms_of_analysis_equal_hist(toy):
    cfg = configuration.from_dict(toy.config)
    events = read_events(cfg)
    histograms = hard_histograms(cfg, events)
    region = cfg.regions[0]
    for key, ev in events.items():
        x = ev.observable.numpy()
        lead_pt, met, w = (
            ev.columns["lead_pt"].numpy(),
            ev.columns["met"].numpy(),
            ev.weight.numpy(),
        )
        keep = (lead_pt > 15.0) & (met < 60.0)
        reference = hist.Hist(hist.axis.Variable(region.binning), storage=hist.storage.Weight())
        reference.fill(x[keep], weight=w[keep])
        np.testing.assert_allclose(histograms[key].yields.numpy(), reference.values(), rtol=1e-12)
        np.testing.assert_allclose(histograms[key].sumw2.numpy(), reference.variances(), rtol=1e-12)
        np.testing.assert_array_equal(histograms[key].edges.numpy(), region.binning)


def test_cut_values_change_the_selection(toy):
    cfg = configuration.from_dict(toy.config)
    events = read_events(cfg)
    tighter = cfg.with_cut_values({"SR:lead_pt>": 30.0})
    ev = events[("SR", "Signal", "nominal")]
    loose, tight = (
        hard_cut_mask(ev, cfg.regions[0].cuts),
        hard_cut_mask(ev, tighter.regions[0].cuts),
    )
    pt, met = ev.columns["lead_pt"], ev.columns["met"]
    assert int(tight.sum()) == int(((pt > 30.0) & (met < 60.0)).sum()) < int(loose.sum())
