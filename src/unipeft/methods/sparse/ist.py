"""IST, Importance-aware Sparse Tuning (Yao et al. 2024, "Layer-wise Importance Matters: Less Memory
for Better Performance in Parameter-efficient Fine-tuning of Large Language Models").

A training strategy on per-layer LoRA, as in the paper (IST chooses which layers' PEFT modules
update): the deltas are plain LoRA deltas and the saved folder is a PEFT "LORA" folder whose
config carries IST's fields, so it reloads as "ist". The strategy is one callback with two loops:

* fine-tuning loop: every `ist_interval` steps, `ist_update_ratio` of the layers are drawn without
  replacement with probability sigmoid(score): only their LoRA deltas train, frozen ones lose
  requires_grad and their optimizer state (LISA's machinery in selective.py), so they stay
  bit-identical through the period. Drawing, not taking the top-k, is the method's exploration:
  every layer keeps a non-zero chance. Deltas outside the numbered layer stack always train.
* importance loop: at the end of every period, `ist_rl_steps` subsets of `ist_suppress_ratio` of
  the layers are drawn with probability sigmoid(-score) (less important layers are probed more
  often) and their LoRA response is scaled by `ist_suppression`; draw k earns the reward
  R_k = exp(-L_k), L_k the loss with it suppressed. With the advantage a_k = R_k - mean(R), every
  layer i of draw k moves by score_i -= ist_rl_lr * a_k * sigmoid(score_i) * (1 - sigmoid(score_i)):
  a layer whose suppression raises the loss more than average becomes more important (the paper's
  score counts the other way round, unimportance; the draws and updates are the same).

The callback keeps the inputs of the period's last micro-batch. The trainer gives callbacks no loss
function, so by default the loss change is linearised in the model output: with the loss gradient
g at the output z of that micro-batch, the reward of draw k is -<g, z_k - z_0>, z_k being the exact
output with draw k suppressed (the paper's exp(-L_k) up to its factor exp(-L_0), which only
rescales `ist_rl_lr`, and a constant the centring removes). Being first-order, it fades where the
batch's loss is flat in the suppression (a batch fitted almost exactly). When the loss is known the
paper's reward is used exactly: a call whose output carries `.loss` (a transformers model called
with labels, as plain loops do), or a loop that sets `IstCallback.loss_fn`. Scores, the RNG and the
current selection are the callback's state, so --resume continues exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch

from ...core.errors import ConfigError
from ...core.fields import fraction, non_negative_int, positive_int, positive_number, unit_ratio
from ...core.hooks import TrainContext, TrainerCallback
from ...core.registry import Capabilities, register
from ..lora.config import LoraConfig
from ..lora.deltas import LAYERS, LoraDelta
from .base import reset_optimizer_state
from .selective import _PeriodicSelection, layer_groups

# Attempts at drawing a suppression subset unlike the earlier ones of the same probe (few layers
# have few distinct subsets: after this many the draw is kept).
_DISTINCT_TRIES = 20


@dataclass
class IstConfig(LoraConfig):
    """LoRA trained by IST: each period only the layers drawn by their learned importance update."""

    ist_update_ratio: float = unit_ratio(0.25, "ist_update_ratio")  # share of layers updated per period
    ist_suppress_ratio: float = unit_ratio(0.5, "ist_suppress_ratio")  # share suppressed per probe draw
    ist_interval: int = positive_int(10)  # steps per period (selection and score update)
    ist_rl_steps: int = positive_int(3)  # suppression draws per score update
    ist_rl_lr: float = positive_number(10.0)  # step size of the score update
    ist_suppression: float = fraction(0.25, "a number with 0 <= ist_suppression < 1")  # response kept when probed
    ist_seed: int = non_negative_int(0)

    def validate(self) -> None:
        """LoRA's checks, plus at least two draws (the advantage is centred over them)."""
        super().validate()
        if self.ist_rl_steps < 2:
            raise ConfigError(f"IstConfig.ist_rl_steps: expected an integer >= 2 (the reward of a draw is compared "
                              f"with the mean of the draws), got {self.ist_rl_steps!r}")

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """The layer selection and the importance update."""
        return [IstCallback(model, adapter_name, self, LoraDelta)]

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """LoRA's small example, updating half of the layers."""
        return {**super().example_fields(candidates), "ist_update_ratio": 0.5}


def layer_count(n_layers: int, ratio: float) -> int:
    """Layers a share selects: int(ratio * n) as the paper, at least one, at most n."""
    return max(1, min(n_layers, int(ratio * n_layers)))


def output_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a loss is computed from: the output itself, its `.logits`, or a tuple's first entry."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)  # transformers' ModelOutput
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


class IstCallback(_PeriodicSelection):
    """IST's two loops; `importance()` reads the current layer scores."""

    def __init__(self, model, adapter_name: str, config: IstConfig, cls: type) -> None:
        super().__init__(model, adapter_name, config, cls)
        self.layers: list[int] = sorted(k for k in layer_groups(self.deltas(), config.layers_pattern)
                                        if k is not None)
        self.scores = torch.zeros(len(self.layers), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(config.ist_seed)
        self._handles: list[Any] = []
        self._probe: dict[str, Any] = {}
        # loss_fn(output, args, kwargs) -> the loss of a model call: a training loop that has one may set
        # it, and the probe then uses the paper's reward exp(-L) instead of the linearised loss change.
        self.loss_fn: Callable[[Any, tuple, dict], torch.Tensor] | None = None

    def importance(self) -> dict[int, float]:
        """{layer index: importance score} (higher: the layer's update matters more)."""
        return {k: float(s) for k, s in zip(self.layers, self.scores)}

    # ---- fine-tuning loop -------------------------------------------------------------------
    def choose(self, deltas: list, period: int) -> set[str]:
        """Layers drawn by sigmoid(score) without replacement, plus every delta outside the layer stack."""
        groups = layer_groups(deltas, self.config.layers_pattern)
        picked: list[int] = []
        if self.layers:
            n = layer_count(len(self.layers), self.config.ist_update_ratio)
            idx = torch.multinomial(self.scores.sigmoid(), n, replacement=False, generator=self.generator)
            picked = [self.layers[i] for i in sorted(idx.tolist())]
        return {d.path for k in [None, *picked] for d in groups.get(k, [])}

    def on_step_begin(self, ctx: TrainContext) -> None:
        interval = self.config.ist_interval
        deltas = self.deltas()
        if ctx.step % interval == 0 or not self.active:  # a new period (or the first step of a run)
            chosen = self.choose(deltas, ctx.step // interval)
            for d in deltas:
                if d.path not in chosen:  # frozen for the period: free its optimizer moments
                    reset_optimizer_state(ctx.optimizer, d.parameters())
            self.active = sorted(chosen)
        active = set(self.active)
        for d in deltas:
            d.requires_grad_(d.path in active)
        if (ctx.step + 1) % interval == 0 and len(self.layers) > 1:
            self._arm()  # this step ends the period: keep its last micro-batch for the probe

    def on_step_end(self, ctx: TrainContext) -> None:
        self._disarm()
        probe, self._probe = self._probe, {}
        if ctx.step % self.config.ist_interval == 0 and "args" in probe:
            self.update_scores(probe["args"], probe["kwargs"], probe.get("grad"))
        super().on_step_end(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        self._disarm()
        self._probe = {}
        super().on_train_end(ctx)

    # ---- importance loop --------------------------------------------------------------------
    def _arm(self) -> None:
        """Hooks on the model call that keep its inputs and the loss gradient at its output."""
        self._disarm()

        def keep_inputs(module, args, kwargs):
            self._probe = {"args": args, "kwargs": kwargs}

        def keep_grad(module, args, kwargs, out):
            z = output_tensor(out)
            if z is not None and z.requires_grad:
                probe = self._probe
                z.register_hook(lambda g: probe.__setitem__("grad", g.detach()))

        self._handles = [self.model.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                         self.model.register_forward_hook(keep_grad, with_kwargs=True)]

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _draw_suppressed(self, earlier: list[list[int]]) -> list[int]:
        """Positions (into self.layers) of one suppression draw, by sigmoid(-score), unlike earlier draws."""
        n = layer_count(len(self.layers), self.config.ist_suppress_ratio)
        prob = (-self.scores).sigmoid()
        for _ in range(_DISTINCT_TRIES):
            pick = sorted(torch.multinomial(prob, n, replacement=False, generator=self.generator).tolist())
            if pick not in earlier:
                break
        return pick

    def _loss(self, result, args, kwargs) -> torch.Tensor | None:
        """The loss of a probe call: `loss_fn`'s, else the one the output carries (a call with labels)."""
        if self.loss_fn is not None:
            return self.loss_fn(result, args, kwargs)
        loss = getattr(result, "loss", None)  # transformers' ModelOutput when the call had labels
        return loss if torch.is_tensor(loss) and loss.numel() == 1 else None

    def rewards(self, args, kwargs, grad: torch.Tensor | None, draws: list[list[int]]) -> list[float] | None:
        """Reward of each draw (its layers' LoRA scaled by ist_suppression): exp(-L_k) when the loss is known,
        else the linearised -<grad, z_k - z_0>; None when neither is available."""
        groups = layer_groups(self.deltas(), self.config.layers_pattern)
        model, was_training = self.model, self.model.training
        model.eval()  # no dropout: the draws differ only by their suppression
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                first = model(*args, **kwargs)
                exact = self._loss(first, args, kwargs) is not None
                z0 = None if exact else output_tensor(first)
                if not exact and (grad is None or z0 is None or z0.shape != grad.shape):
                    return None
                out: list[float] = []
                for pick in draws:
                    probed = [d for i in pick for d in groups.get(self.layers[i], [])]
                    raw = [d.scaling for d in probed]
                    try:
                        for d, s in zip(probed, raw):
                            d.scaling = s * self.config.ist_suppression
                        result = model(*args, **kwargs)
                    finally:
                        for d, s in zip(probed, raw):
                            d.scaling = s
                    if exact:
                        out.append(math.exp(-float(self._loss(result, args, kwargs))))
                    else:
                        dz = output_tensor(result).to(torch.float64) - z0.to(torch.float64)
                        out.append(-float((grad.to(torch.float64) * dz).sum()))
        finally:
            model.train(was_training)
        return out

    def update_scores(self, args, kwargs, grad: torch.Tensor | None = None) -> None:
        """One importance update from a kept micro-batch (its inputs and, without `loss_fn`, the loss
        gradient at its output)."""
        draws: list[list[int]] = []
        for _ in range(self.config.ist_rl_steps):
            draws.append(self._draw_suppressed(draws))
        found = self.rewards(args, kwargs, grad, draws)
        if found is None:  # the call gave neither a loss nor a gradient at its output
            return
        reward = torch.tensor(found, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process must keep the same scores (and so select the same layers): average the probes
            torch.distributed.all_reduce(reward)
            reward /= torch.distributed.get_world_size()
        advantage = reward - reward.mean()
        p = self.scores.sigmoid()
        step = torch.zeros_like(self.scores)
        for pick, a in zip(draws, advantage.tolist()):
            for i in pick:  # suppressing these layers paid off: they matter less
                step[i] -= self.config.ist_rl_lr * a * p[i] * (1 - p[i])
        self.scores += step

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Scores, RNG state and the current period's selection."""
        return {"layers": list(self.layers), "scores": self.scores.clone(), "rng": self.generator.get_state(),
                "active": list(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (the adapter's layers must be the same)."""
        if not state:
            return
        if list(state["layers"]) != self.layers:
            raise ConfigError(f"IstConfig: the checkpoint scores layers {list(state['layers'])}, this adapter has "
                              f"LoRA deltas in layers {self.layers}; was target_modules changed?")
        self.scores = state["scores"].to(torch.float64).clone()
        self.generator.set_state(state["rng"])
        self.active = list(state["active"])


LoraConfig.strategy_keys["ist_update_ratio"] = IstConfig
register("ist", IstConfig, LoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                   quantized_base=True))
