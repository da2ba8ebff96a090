"""trainable_report: how many parameters train, where, and as what fraction of the model."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class TrainableReport:
    """Counts of trainable vs all parameters, with one row per adapted module."""

    trainable: int
    total: int
    rows: list[tuple[str, str, str, int]] = field(default_factory=list)  # (module, adapter, method, params)

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line, as PEFT prints it."""
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")

    def table(self, limit: int = 50) -> str:
        """A per-module table (first `limit` rows)."""
        if not self.rows:
            return self.summary()
        width = max(len(r[0]) for r in self.rows[:limit])
        lines = [f"{'module':<{width}}  {'adapter':<10} {'method':<16} {'params':>10}"]
        lines += [f"{m:<{width}}  {a:<10} {meth:<16} {n:>10,}" for m, a, meth, n in self.rows[:limit]]
        if len(self.rows) > limit:
            lines.append(f"... {len(self.rows) - limit} more modules")
        return "\n".join(lines + [self.summary()])

    def __str__(self) -> str:
        return self.table()


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters; for an AdaptedModel also list each adapted module."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    from .model import AdaptedModel

    rows = []
    if isinstance(model, AdaptedModel):
        for site in model.sites():
            for name, delta in site.deltas.items():
                n = sum(p.numel() for p in delta.parameters() if p.requires_grad)
                method = type(model.peft_config[name]).method
                rows.append((site.path, name, method, n))
    return TrainableReport(trainable, total, rows)
