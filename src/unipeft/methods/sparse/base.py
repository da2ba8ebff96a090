"""Shared machinery of the selective methods: a sparse additive delta with a sparse-only backward.

A `SparseDelta` on a (out x in) matrix W holds k selected entries as a flat index vector
(`indices`, int64, row-major positions, kept sorted) and a trainable value vector (`values`).
Its forward adds x @ dW^T to the base output with a CSR sparse matmul, and its backward computes
the value gradients only at the selected (row, col) pairs (a sampled dense-dense product), so
gradients and optimizer state have k entries, not out*in. Merging goes through core's generic
code via `delta_weight()`, which scatters the values into a dense matrix.
"""
from __future__ import annotations

import warnings
import zlib

import torch
from torch import nn
from ...core import layers
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError

# Layers whose weight is one (out, in) matrix (quantized linears included: read through the dense view).
SPARSE_LAYERS = layers.MATRIX_LAYERS
# Bound on (rows x selected entries) held at once by the chunked fallback of the backward.
CHUNK_ELEMENTS = 1 << 22


class Layout:
    """CSR structures of one index set (and of its transpose), built once per index change."""

    def __init__(self, flat: torch.Tensor, out_f: int, in_f: int) -> None:
        # int32 structures: 12 bytes per selected entry in all, which is the point of the method.
        idx = torch.int32 if out_f * in_f < 2 ** 31 else torch.int64
        flat = flat.to(torch.int64)
        rows, cols = flat // in_f, flat % in_f
        counts = torch.bincount(rows, minlength=out_f)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(idx)
        self.col = cols.to(idx)
        # The transpose (in x out) in CSR: entries re-sorted by (col, row).
        t_perm = torch.argsort(cols * out_f + rows)
        t_counts = torch.bincount(cols, minlength=in_f)
        self.t_crow = torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)]).to(idx)
        self.t_col = rows[t_perm].to(idx)
        self.t_perm = t_perm.to(idx)
        self.shape = (out_f, in_f)

    @property
    def rows(self) -> torch.Tensor:
        """Row of each entry (int64, built on demand)."""
        counts = (self.crow[1:] - self.crow[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    @property
    def cols(self) -> torch.Tensor:
        """Column of each entry (int64)."""
        return self.col.to(torch.int64)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse (out x in) matrix with these values, in CSR."""
        return _csr(self.crow, self.col, values, self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """Its transpose (in x out), in CSR."""
        return _csr(self.t_crow, self.t_col, values[self.t_perm], self.shape[::-1])


def _csr(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags CSR as beta on first use; the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def sampled_grad(layout: Layout, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(grad_out^T @ x) at the selected entries only: grad_vals[j] = sum_n grad_out[n, r_j] * x[n, c_j]."""
    if grad_out.dtype in (torch.float32, torch.float64) and grad_out.device.type == "cpu":
        pattern = layout.matrix(torch.zeros(layout.col.numel(), dtype=grad_out.dtype))
        return torch.sparse.sampled_addmm(pattern, grad_out.T, x, beta=0.0).values()
    return chunked_sampled_grad(layout.rows, layout.cols, grad_out, x)


def chunked_sampled_grad(rows: torch.Tensor, cols: torch.Tensor, grad_out: torch.Tensor,
                         x: torch.Tensor) -> torch.Tensor:
    """The same product by gathering columns in chunks (any dtype/device; memory bounded by CHUNK_ELEMENTS)."""
    g_t, x_t = grad_out.T.contiguous(), x.T.contiguous()
    out = torch.empty(rows.numel(), dtype=grad_out.dtype, device=grad_out.device)
    step = max(1, CHUNK_ELEMENTS // max(1, grad_out.shape[0]))
    for s in range(0, rows.numel(), step):
        out[s:s + step] = (g_t[rows[s:s + step]] * x_t[cols[s:s + step]]).sum(1)
    return out


class SparseMatmul(torch.autograd.Function):
    """y = x @ (S + F)^T for trainable sparse S and a constant sparse F; backward: grad of S's values only."""

    @staticmethod
    def forward(ctx, x, values, layout, frozen):
        x2 = x.reshape(-1, x.shape[-1])
        y = (layout.matrix(values.detach()) @ x2.T).T
        if frozen is not None:
            y = y + (frozen[0].matrix(frozen[1]) @ x2.T).T
        ctx.save_for_backward(x2, values)
        ctx.layout, ctx.frozen, ctx.x_shape = layout, frozen, x.shape
        return y.reshape(*x.shape[:-1], layout.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, values = ctx.saved_tensors
        layout, frozen = ctx.layout, ctx.frozen
        g2 = grad.reshape(-1, layout.shape[0])
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            gx = (layout.matrix_t(values.detach()) @ g2.T).T
            if frozen is not None:
                gx = gx + (frozen[0].matrix_t(frozen[1]) @ g2.T).T
            grad_x = gx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_v = sampled_grad(layout, g2, x2)
        hook = getattr(layout, "on_backward", None)
        if hook is not None:  # e.g. SpIEL's regrowth looks at the dense gradient of this step
            hook(g2, x2)
        return grad_x, grad_v, None, None


def require_matrix_layer(base: nn.Module, config, path: str) -> None:
    """TargetError unless `base` is a Linear or GPT-2 Conv1D (the layers whose weight is one matrix)."""
    if not layers.is_matrix_layer(base):
        raise TargetError(f"{type(config).__name__}: module '{path}' is a {type(base).__name__}; supported: "
                          f"Linear and GPT-2 Conv1D layers")



def lowest_magnitude(w: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat positions of the k entries of smallest |w| (those below the k/numel quantile)."""
    flat = w.detach().abs().flatten()
    return torch.topk(flat, k, largest=False, sorted=False).indices.sort().values


def count_for(ratio: float, numel: int) -> int:
    """Entries a ratio selects in a matrix of numel entries (at least one)."""
    return max(1, min(numel, int(ratio * numel)))


def path_seed(seed: int, path: str) -> int:
    """A seed that depends only on (seed, module path), so selections are reproducible per module."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2 ** 31)


class SparseDelta(Delta):
    """Parallel additive sparse delta: out = base(x) + x @ dW^T with dW non-zero at `indices` only.

    `frozen_slots` > 0 reserves constant (index, value) storage for earlier selection rounds
    (SaRA's progressive re-selection): their values stay in the delta but no longer train.
    """

    kind = "output"
    commutes = True  # additive
    prefix = "sparse"  # on-disk key prefix: <path>.<prefix>_values, <path>.<prefix>_indices

    def __init__(self, base: nn.Module, config, path: str, bank: nn.Module | None = None, *, k: int,
                 frozen_slots: int = 0, init_indices: torch.Tensor | None = None) -> None:
        super().__init__(base, config, path, bank)
        require_matrix_layer(base, config, path)
        w = layers.dense_weight(base)
        self.out_features, self.in_features = w.shape
        if init_indices is None:
            init_indices = lowest_magnitude(w, k)
        self.values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=w.device))
        # Flat row-major positions, int32 while the matrix allows (half the memory of int64).
        idx = torch.int32 if w.numel() < 2 ** 31 else torch.int64
        self.register_buffer("indices", init_indices.to(idx).sort().values)
        if frozen_slots:
            self.register_buffer("frozen_indices", torch.zeros(frozen_slots, dtype=idx, device=w.device))
            self.register_buffer("frozen_values", torch.zeros(frozen_slots, dtype=torch.float32, device=w.device))
        self._cache: tuple | None = None
        self._frozen_cache: tuple | None = None

    # ---- structures derived from the index buffers (rebuilt when a buffer is written) ----
    def layout(self) -> Layout:
        """The CSR layout of the current index set (cached on the buffer's version)."""
        key = (self.indices.data_ptr(), self.indices._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, Layout(self.indices, self.out_features, self.in_features))
        return self._cache[1]

    def frozen(self) -> tuple[Layout, torch.Tensor] | None:
        """(layout, values) of the frozen entries of earlier rounds, or None while there are none."""
        if not hasattr(self, "frozen_values"):
            return None
        key = (self.frozen_indices._version, self.frozen_values._version, self.frozen_values.data_ptr())
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            fv = self.frozen_values
            live = fv != 0
            if not bool(live.any()):
                self._frozen_cache = (key, None)
            else:  # coalesce: the same entry may have trained in several rounds
                idx, inv = torch.unique(self.frozen_indices[live], return_inverse=True)
                vals = torch.zeros(idx.numel(), dtype=fv.dtype, device=fv.device).index_add_(0, inv, fv[live])
                self._frozen_cache = (key, (Layout(idx, self.out_features, self.in_features), vals))
        return self._frozen_cache[1]

    # ---- the delta ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = x if x.dtype == self.values.dtype else x.to(self.values.dtype)
        frozen = self.frozen()
        if frozen is not None and frozen[1].dtype != h.dtype:
            frozen = (frozen[0], frozen[1].to(h.dtype))
        d = SparseMatmul.apply(h, self.values, self.layout(), frozen)
        return base_out + d.to(base_out.dtype)

    def dense_delta(self) -> torch.Tensor:
        """dW as a dense (out, in) matrix (differentiable in `values`)."""
        n = self.out_features * self.in_features
        flat = torch.zeros(n, dtype=self.values.dtype, device=self.values.device)
        flat = flat.index_add(0, self.indices.long(), self.values)
        if hasattr(self, "frozen_values"):
            flat = flat.index_add(0, self.frozen_indices.long(), self.frozen_values.to(flat.dtype))
        return flat.view(self.out_features, self.in_features)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.dense_delta())}

    def saved_key(self, key: str) -> str:
        return f"{self.prefix}_{key}"

    # ---- changing the index set during training -----------------------------------------
    def set_selection(self, flat: torch.Tensor, values: torch.Tensor | None = None, optimizer=None) -> None:
        """Replace the index set by `flat` (k positions) with `values` (default zero), in place.

        Optimizer moments follow the entries that stay selected and start at zero for new ones,
        so the optimizer never applies one entry's history to another.
        """
        k = self.values.numel()
        if flat.numel() != k:
            raise ValueError(f"{self.path}: a selection must keep {k} entries, got {flat.numel()}")
        flat, order = flat.to(self.indices.device, self.indices.dtype).sort()
        new_vals = torch.zeros(k, dtype=self.values.dtype, device=self.values.device) if values is None \
            else values.to(self.values.dtype)[order]
        state = optimizer.state.get(self.values) if optimizer is not None else None
        if state:
            # old slot of each new entry (-1 if newly selected)
            pos = torch.searchsorted(self.indices, flat).clamp(max=k - 1)
            kept = self.indices[pos] == flat
            for name, t in state.items():
                if torch.is_tensor(t) and t.shape == self.values.shape:
                    moved = torch.where(kept, t[pos], torch.zeros_like(t))
                    t.copy_(moved)
        with torch.no_grad():
            self.indices.copy_(flat)
            self.values.copy_(new_vals)

    def freeze_round(self, slot: int) -> None:
        """Move the trained values into frozen round `slot` (they stay applied, no longer train)."""
        k = self.values.numel()
        with torch.no_grad():
            self.frozen_indices[slot * k:(slot + 1) * k].copy_(self.indices)
            self.frozen_values[slot * k:(slot + 1) * k].copy_(self.values.detach())


def sparse_deltas(model, adapter_name: str, cls: type = SparseDelta) -> list:
    """The deltas of `adapter_name` (of class `cls`) at every site of `model`."""
    return [d for d in model.deltas(adapter_name) if isinstance(d, cls)]


def reset_optimizer_state(optimizer, params) -> None:
    """Forget the optimizer's state of `params` (their history no longer applies / frees memory)."""
    if optimizer is None:
        return
    for p in params:
        optimizer.state.pop(p, None)


SELECTION_BUFFERS = ("indices", "frozen_indices", "frozen_values")


def selection_state(deltas: list[SparseDelta]) -> dict[str, dict[str, torch.Tensor]]:
    """The index buffers of `deltas` by path: trainer checkpoints hold only trainable tensors, so a
    method that changes its selection keeps these in its callback state for an exact resume."""
    return {d.path: {k: getattr(d, k).detach().to("cpu").clone() for k in SELECTION_BUFFERS if hasattr(d, k)}
            for d in deltas}


def load_selection_state(deltas: list[SparseDelta], state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore what selection_state() returned (paths must match)."""
    missing = sorted({d.path for d in deltas} - set(state))
    if missing:
        raise ConfigError(f"checkpoint has no sparse selection for {missing[:3]}; was the config changed?")
    with torch.no_grad():
        for d in deltas:
            for k, t in state[d.path].items():
                getattr(d, k).copy_(t)
