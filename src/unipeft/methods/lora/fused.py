"""The fused LoRA linear: a site's base GEMM, LoRA shrink and expand in one autograd function, and
one function for a group of sites that receive the very same input tensor (BERT's or Llama's
query/key/value).

Per group, in the forward: the input is dropped out once (one mask shared by the group), one
shrink GEMM runs over the members' concatenated A matrices, and each member's expand is added in
place into its base output (`addmm_`). In the backward: the input gradient is accumulated in place
into one tensor (base and LoRA parts of every member), each small GEMM runs in the operand layout
that BLAS handles fastest, and only the dropped-out input, the shrunk activations and the mask
are saved (one copy for the whole group). With p = 0 nothing is masked or copied.

Groups are learned, not guessed: during the first model call after the active adapters change,
every eligible delta records the input object it was called with; when the next call starts,
deltas that saw the same object form a group. At run time a member is served from its group's
result only if it receives that very object at the same in-place version; anything else runs the
single-site function, so a wrong guess costs time, never correctness.

Dropout masks come from 16-bit random lanes (four per 64-bit draw), so p is rounded to a multiple
of 2^-16 (0.1 -> 0.100006); the mask is 4-5x cheaper to draw than `bernoulli_`'s.
"""
from __future__ import annotations

import math

import torch

from ...core import layers

LANES = 65536  # dropout resolution: p is a multiple of 1 / LANES


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, each entry True with probability 1 - p (p rounded to a multiple of 2^-16)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2 ** 63), None)
    return words.view(torch.int16)[:n].view(shape) >= (round(p * LANES) - LANES // 2)


class Member:
    """What the fused function needs of one LoRA linear delta (read at call time: weights may be swapped)."""

    __slots__ = ("delta", "transposed", "r", "out_features")

    def __init__(self, delta) -> None:
        geo = layers.geometry(delta.base)
        self.delta, self.r = delta, delta.r
        self.transposed, self.out_features = geo.kind == "transposed", geo.out_features

    def tensors(self) -> tuple:
        base, d = self.delta.base, self.delta
        return base.weight, base.bias, d.lora_A.weight, d.lora_B.weight


class FusedLora(torch.autograd.Function):
    """Outputs of `members` (base + LoRA each) for one shared input; see the module docstring."""

    @staticmethod
    def forward(ctx, x, members, scalings, p, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        mask = keep_mask(x2.shape, p, x2.device) if p > 0 else None
        xd = x2.mul(mask).mul_(1.0 / (1.0 - p)) if mask is not None else x2
        a_cat = tensors[2] if len(members) == 1 else torch.cat(tensors[2::4])
        h = xd @ a_cat.t()
        outs, off = [], 0
        for i, m in enumerate(members):
            w, bias, _, b = tensors[4 * i: 4 * i + 4]
            wt = w if m.transposed else w.t()
            out = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
            out.addmm_(h[:, off:off + m.r], b.t(), alpha=scalings[i])
            outs.append(out.view(*x.shape[:-1], m.out_features))
            off += m.r
        ctx.members, ctx.scalings, ctx.p, ctx.x_shape = members, scalings, p, x.shape
        ctx.save_for_backward(xd, h, mask, a_cat, *tensors[0::4], *tensors[3::4])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        members, scalings, p = ctx.members, ctx.scalings, ctx.p
        xd, h, mask, a_cat, *rest = ctx.saved_tensors
        weights, bs = rest[:len(members)], rest[len(members):]
        need_x = ctx.needs_input_grad[0]
        gx, gh, gbs, off = None, [], [], 0
        for i, (m, g) in enumerate(zip(members, grads)):
            if g is None:
                gh.append(h.new_zeros(h.shape[0], m.r))
                gbs.append(None)
                off += m.r
                continue
            g2 = g.reshape(-1, m.out_features)
            if need_x:
                w = weights[i].t() if m.transposed else weights[i]
                gx = torch.mm(g2, w) if gx is None else gx.addmm_(g2, w)
            s = scalings[i]
            # (h^T g)^T and g (B^T)^T: the layouts a BLAS GEMM runs 2-2.5x faster than g^T h and g B.
            gbs.append(torch.mm(h[:, off:off + m.r].t(), g2).t().mul_(s))
            gh.append(torch.mm(g2, bs[i].t().contiguous().t()).mul_(s))
            off += m.r
        gh = gh[0] if len(gh) == 1 else torch.cat(gh, 1)
        ga = torch.mm(gh.t(), xd)
        if need_x:
            if mask is None and gx is not None:
                gx.addmm_(gh, a_cat)
            else:
                lora_gx = torch.mm(gh, a_cat)
                if mask is not None:
                    lora_gx.mul_(mask).mul_(1.0 / (1.0 - p))
                gx = lora_gx if gx is None else gx.add_(lora_gx)
            gx = gx.view(ctx.x_shape)
        out, off = [gx, None, None, None], 0
        for i, m in enumerate(members):
            out += [None, None, ga[off:off + m.r], gbs[i]]
            off += m.r
        return tuple(out)


def run_members(members: list[Member], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Base + LoRA outputs of `members` on the shared input `x`."""
    deltas = [m.delta for m in members]
    args = (members, [d.scaling for d in deltas], dropout_p(deltas[0]))
    tensors = [t for m in members for t in m.tensors()]
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, *tensors)):
        return FusedLora.forward(_NoGradCtx(), x, *args, *tensors)
    return FusedLora.apply(x, *args, *tensors)


def configured_p(delta) -> float:
    """The dropout probability of `delta`'s config (whether or not it is training)."""
    drop = delta.lora_dropout
    return drop.p if isinstance(drop, torch.nn.Dropout) else 0.0


def dropout_p(delta) -> float:
    """The dropout probability `delta` applies now (0 in eval mode or without dropout)."""
    return configured_p(delta) if delta.training else 0.0


class _NoGradCtx:
    """Stands in for autograd's ctx when nothing needs a gradient (no graph, nothing saved)."""

    def save_for_backward(self, *_):
        pass

    def set_materialize_grads(self, _):
        pass


class Group:
    """Sites that receive one input tensor: the first to be called computes every member's output."""

    def __init__(self, deltas: list) -> None:
        self.members = [Member(d) for d in deltas]
        self.index = {id(d): i for i, d in enumerate(deltas)}
        self.pending: tuple | None = None  # (input, its _version, {member index: output})

    def output(self, delta, x: torch.Tensor) -> torch.Tensor:
        i = self.index[id(delta)]
        pending = self.pending
        if pending is not None and pending[0] is x and pending[1] == x._version and i in pending[2]:
            out = pending[2].pop(i)
            if not pending[2]:
                self.pending = None
            return out
        outs = run_members(self.members, x)
        self.pending = (x, x._version, {j: o for j, o in enumerate(outs) if j != i})
        return outs[i]


class Groups:
    """Per model: the learned groups, valid for one version of its forward context.

    Learning spans one top-level model call (`calls`): recomputing a checkpointed layer during
    its backward belongs to the same call, so it computes exactly what the original forward did."""

    def __init__(self) -> None:
        self.version = -1
        self.learning_call = -1
        self.ready = False
        self.seen: dict[int, tuple[torch.Tensor, list]] = {}
        self.observed: set[int] = set()
        self.group_of: dict[int, Group] = {}

    def lookup(self, delta, x: torch.Tensor, ctx) -> Group | None:
        """The group of `delta` (None: run alone); while learning, record the input it was given."""
        if ctx.version != self.version:
            self.__init__()
            self.version, self.learning_call = ctx.version, ctx.calls
        if self.ready:
            return self.group_of.get(id(delta))
        if ctx.calls != self.learning_call:  # the next model call has begun: freeze what the last one showed
            self._freeze()
            return self.group_of.get(id(delta))
        if id(delta) not in self.observed:
            self.observed.add(id(delta))
            self.seen.setdefault(id(x), (x, []))[1].append(delta)
        return None

    def _freeze(self) -> None:
        for _, deltas in self.seen.values():
            by_kind: dict[tuple, list] = {}
            for d in deltas:
                by_kind.setdefault((configured_p(d), d.lora_A.weight.dtype), []).append(d)
            for same in by_kind.values():
                if len(same) > 1:
                    group = Group(same)
                    self.group_of.update((id(d), group) for d in same)
        self.seen.clear()
        self.ready = True
