"""The numpy backend: fits, hypotests, significances and limits of small pyhf workspaces
without importing torch.

Why a second engine: ``import torch`` alone takes 1.5-3 s, more than ``pyhf fit`` needs in
all for a workspace of a few bins, so a command-line fit of such a workspace cannot be faster
than pyhf with torch in the process. The likelihood of a small model is a few hundred numbers;
numpy evaluates it, with exact analytic derivatives, in microseconds. ``diffana fit``,
``hypotest``, ``significance`` and ``limit`` therefore run JSON workspaces with at most
:data:`AUTO_MAX_PARAMETERS` parameters here (``--backend auto``, the default), and everything
else on the torch engine (:mod:`analysis.likelihood`, :mod:`analysis.inference`), which stays
the reference: the same semantics (pyhf's), the same fits (projected Newton with the exact
Hessian, from the same starts), the same results to the fits' tolerance, tested against it
and against pyhf case by case.

The backend takes the common case only. Whatever it does not cover, or a fit that it cannot
bring to a clean minimum (not converged, a parameter on a bound where the torch engine's
one-sided profile errors are needed, a degenerate Hessian), raises :class:`Unsupported`, and
the command runs on the torch engine instead, which reports the problem as it always does.

Modules: :mod:`~analysis.numpy_backend.model` (the HistFactory model and its derivatives),
:mod:`~analysis.numpy_backend.fit` (batched projected Newton fits),
:mod:`~analysis.numpy_backend.infer` (asymptotic CLs, significance, limits, the global fit).
Nothing here imports torch, scipy or pyhf.
"""

from __future__ import annotations

#: ``--backend auto`` runs a JSON workspace on numpy up to this many parameters: there the
#: whole command takes less time than importing torch (measured in benchmarks/bench_stats.py)
AUTO_MAX_PARAMETERS = 40

#: in a process that has torch already, a model's fits find their minima with this backend's
#: Newton up to this many parameters (:meth:`analysis.likelihood.Model.with_numpy_fits`): its
#: cost grows faster with the parameters than torch's (measured, one thread, one fit: 41
#: parameters 2.2 ms against torch's 6.7 ms, 71: 4.7 against 7.7, 101: 9.7 against 8.4, 219
#: (ATLAS SUSY-2018-16): 632 against 83; the demo analysis, 42: 3.7 against 19.8). The numpy
#: model's build comes on top, once per model (2.5 ms for the demo): near the limit a model
#: fitted once may take longer than with torch, one fitted several times (limits) less
FIT_MAX_PARAMETERS = 80


class Unsupported(Exception):
    """The numpy backend does not cover this input or result; the torch engine takes over."""
