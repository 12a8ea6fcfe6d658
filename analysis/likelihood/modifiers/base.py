"""What every modifier type shares: the cell layout, the build protocol, gather helpers.

Layout. The model's expected rates live on a flat *cell* axis: one cell per (channel, sample,
bin) that the spec defines, channels in pyhf's order (sorted names), samples sorted within each
channel. A :class:`Block` is the run of cells of one (channel, sample); every modifier acts on
whole blocks.

Column layout. Inside the model, parameters are passed to modifiers as ``x`` of shape
``(n_pars, batch)`` (the transpose of the user's ``(..., n_pars)`` with the batch flattened):
gathering rows of a contiguous ``(features, batch)`` tensor is a block copy, tens of times
faster than gathering along the last axis of a large batch. ``apply(x)`` of a multiplicative
modifier type returns the product of all its factors per cell, of an additive type the sum of
its deltas, both of shape ``(n_cells, batch)``.

Build protocol (mirrors pyhf's builder / combined pair):

1. ``add(name, data, block, path)`` once per modifier entry, in pyhf's walk order (channels
   sorted, samples sorted, then modifiers sorted by ``(name, type)``);
2. ``requirements()``: the parameter sets this type needs, in the order pyhf registers them;
3. ``finalize(par_slices, npars)``: turn everything into index and value tensors;
4. ``apply(x)`` per call: a handful of vectorised tensor ops, no loop over bins or samples.

Multiplicative types also expose ``entries`` (per block, the *unit* acting on each cell) and
``values(x)`` (one row per unit) so that the model multiplies all types' factors in a single
gather (:func:`gather_product`); ``apply`` is the same computation for one type alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from analysis.errors import ConfigError
from analysis.likelihood._tensors import as_tensor
from analysis.likelihood.parameters import Requirement


@dataclass(frozen=True)
class Block:
    """The cells of one (channel, sample) pair."""

    channel: str
    sample: str
    index: int  # position among the model's blocks
    cells: slice  # into the cell axis
    bins: slice  # into the main-data axis (the channel's bins)
    nominal: torch.Tensor  # (nbins,) in the model's dtype/device, may carry gradients
    path: str  # JSON path of the sample, for messages: "channels[0].samples[1]"

    @property
    def nbins(self) -> int:
        return self.bins.stop - self.bins.start


@dataclass(frozen=True)
class Layout:
    """Sizes, dtype and device shared by all modifier types of one model."""

    ncells: int
    nbins: int
    channel_bins: Mapping[str, slice]
    dtype: torch.dtype
    device: torch.device
    source: str  # name of the workspace, for messages


class SlotTable:
    """Collects, per row of an output (a cell or a block), the *units* (rows of a value
    tensor) whose product it is.

    ``build`` returns a ``(K, n_rows)`` index tensor, K the largest number of units on one
    row, padded with ``pad`` (an index that the caller maps to a row of ones).
    """

    def __init__(self, nrows: int) -> None:
        self._nrows = nrows
        self._layers: list[list[int | None]] = []
        self._depth: dict[int, int] = {}

    def put(self, rows: slice, units: list[int]) -> None:
        """Add one unit to each row in ``rows`` (``units`` has one entry per row)."""
        depth = self._depth.get(rows.start, 0)
        self._depth[rows.start] = depth + 1
        if depth == len(self._layers):
            self._layers.append([None] * self._nrows)
        self._layers[depth][rows] = units

    def build(self, pad: int, device: torch.device) -> torch.Tensor:
        rows = [[pad if u is None else u for u in layer] for layer in self._layers]
        return torch.tensor(rows, dtype=torch.long, device=device).reshape(-1, self._nrows)


# above this many gathered elements, multiply layer by layer instead of gathering all at once
_FLAT_GATHER_LIMIT = 1 << 22


def gather_product(padded: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Per output row ``r``: ``prod_k padded[slots[k, r]]``.

    ``padded`` is ``(U + 1, batch)`` whose last row is ones (the index ``slots`` uses for
    padding, see :func:`with_ones`), ``slots`` is ``(K, n_rows)``; returns ``(n_rows, batch)``.
    Row gathers and products only, so it is differentiable to any order.
    """
    k, nrows = slots.shape
    if k == 1:
        return padded.index_select(0, slots[0])
    if k * nrows * padded.shape[1] <= _FLAT_GATHER_LIMIT:
        gathered = padded.index_select(0, slots.view(-1))
        return gathered.view(k, nrows, -1).prod(0)
    out = padded.index_select(0, slots[0])
    for layer in slots[1:]:
        out = out * padded.index_select(0, layer)
    return out


def with_ones(rows: list[torch.Tensor]) -> torch.Tensor:
    """``rows`` stacked along dim 0 with a final row of ones (the padding unit)."""
    first = rows[0]
    return torch.cat([*rows, first.new_ones((1, first.shape[1]))])


def alpha_requirements(names: Mapping[str, Any]) -> dict[str, Requirement]:
    """The interpolation parameters of histosys and normsys: one per name, constrained by a
    standard normal (auxdata 0, sigma 1), init 0, bounds [-5, 5], as in pyhf."""
    return {
        name: Requirement(
            n=1,
            is_scalar=True,
            constraint="normal",
            inits=(0.0,),
            bounds=((-5.0, 5.0),),
            fixed=False,
            auxdata=(0.0,),
            unused=frozenset({"sigmas", "factors"}),
        )
        for name in names
    }


class Modifier:
    """Base class of a modifier type (one per file in this package)."""

    type: ClassVar[str]
    op: ClassVar[str]  # "multiply" or "add"
    interpcodes: ClassVar[tuple[str, ...]] = ()  # allowed codes, the first is the default
    shared: ClassVar[bool] = True  # may one name appear on several samples? (pyhf is_shared)

    def __init__(self, layout: Layout, interpcode: str | None = None) -> None:
        self.layout = layout
        if interpcode is not None and interpcode not in self.interpcodes:
            valid = ", ".join(self.interpcodes) or "none"
            raise ConfigError(
                f"{layout.source}: interpolation code '{interpcode}' is not available for "
                f"{self.type}; valid: {valid}"
            )
        self.interpcode = interpcode or (self.interpcodes[0] if self.interpcodes else None)
        self._names: dict[str, None] = {}  # parameter sets in order of first use

    @property
    def active(self) -> bool:
        """Whether any sample uses a modifier of this type."""
        return bool(self._names)

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        raise NotImplementedError

    def requirements(self) -> dict[str, Requirement]:
        raise NotImplementedError

    def finalize(self, par_slices: Mapping[str, slice], npars: int) -> None:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: parameters ``(n_pars, batch)``; returns ``(n_cells, batch)``."""
        raise NotImplementedError

    def _tensor(self, value: Any) -> torch.Tensor:
        return as_tensor(value, dtype=self.layout.dtype, device=self.layout.device)

    def _check_length(self, values: torch.Tensor, block: Block, path: str, what: str) -> None:
        if values.shape != (block.nbins,):
            raise ConfigError(
                f"{self.layout.source}: {path}: {what} has {tuple(values.shape)} values but "
                f"channel '{block.channel}' has {block.nbins} bins"
            )


class Factor(Modifier):
    """A multiplicative modifier type: a product of per-unit factors on each cell.

    After ``finalize``: ``entries`` lists ``(block, units)``, one unit index per cell of the
    block, or a single ``int`` for all of them when ``per_block`` (the factor is constant over
    a block: normfactor, lumi, normsys); ``values(x)`` gives the units' factors,
    ``(n_units, batch)``. When ``on_pars`` is true the units are the parameters themselves
    (``values(x)`` is ``x``); otherwise unit ``u`` is a function of one parameter,
    ``unit_parameters[u]``, through :meth:`factor` (what exact derivatives need).
    """

    op = "multiply"
    on_pars: ClassVar[bool] = False
    per_block: ClassVar[bool] = False

    def __init__(self, layout: Layout, interpcode: str | None = None) -> None:
        super().__init__(layout, interpcode)
        self.entries: list[tuple[Block, Any]] = []
        self.n_units = 0
        self.unit_parameters = torch.zeros(0, dtype=torch.long, device=layout.device)
        self._slots: torch.Tensor | None = None

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The units' factors ``f_u(x[unit_parameters[u]])``, ``(n_units, batch)``."""
        return self.factor(x.index_select(0, self.unit_parameters))

    def factor(self, alpha: torch.Tensor) -> torch.Tensor:
        """Elementwise factor of each unit from its parameter's values ``alpha``
        (``(n_units, batch)``); types with ``on_pars`` have none (the factor is the parameter)."""
        raise NotImplementedError

    def factor_derivatives(
        self, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`factor` and its first and second derivatives in ``alpha``, detached (for
        exact Hessians, :mod:`analysis.likelihood.derivatives`)."""
        raise NotImplementedError

    def cell_units(self, block: Block, units: Any) -> list[int]:
        """The unit index of each cell of ``block`` for an entry's ``units``."""
        return [units] * block.nbins if self.per_block else list(units)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values(x)
        if self._slots is None:
            table = SlotTable(self.layout.ncells)
            for block, units in self.entries:
                table.put(block.cells, self.cell_units(block, units))
            self._slots = table.build(pad=values.shape[0], device=self.layout.device)
        return gather_product(with_ones([values]), self._slots)


class ParameterFactor(Factor):
    """A multiplicative modifier whose factor on a cell is one model parameter.

    Subclasses say which parameter acts on the cells of a block (:meth:`_units`: an ``int``
    for ``per_block`` types, else one index per cell).
    """

    on_pars = True

    def __init__(self, layout: Layout, interpcode: str | None = None) -> None:
        super().__init__(layout, interpcode)
        self._uses: list[tuple[str, Block]] = []

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        self._names.setdefault(name)
        self._uses.append((name, block))

    def _units(self, name: str, block: Block, start: int) -> Any:
        raise NotImplementedError

    def finalize(self, par_slices: Mapping[str, slice], npars: int) -> None:
        self.n_units = npars
        self.entries = [
            (block, self._units(name, block, par_slices[name].start)) for name, block in self._uses
        ]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return x
