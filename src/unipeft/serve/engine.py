"""Continuous-batching generation engine over an AdaptedModel wrapping a transformers causal LM.

A background scheduler thread owns the model. Each iteration runs the functions handed to `run_exclusive`
(adapter loads and unloads, between steps), admits waiting requests up to `max_batch`, prefills their
prompts (left-padded, one forward per group), then runs ONE decode step over all running sequences. A
group is one forward: adapters that can share a batch (LoRA family, the base) form one, with one adapter
name per row; each that cannot (capability mixed_batch False, e.g. prompt methods, or an init editing the
base weights) forms its own. A group's KV caches stay packed in one left-padded DynamicCache from step to
step (kv.Batch) while its members stay the same, with a mask marking the padding and each row's own
position ids; rows of finished requests are dropped, newcomers are packed in. While it runs, the model's
`static_weights` is set: weights change only through `run_exclusive` jobs, after which caches are rebuilt.

Events: one TokenEvent per output token, then a final one (token_id None, finished True, reason "stop" on
end-of-sequence or a stop sequence, "length" on max_tokens, "cancelled" after `cancel`); a request that
cannot run gets one event with `error` set. Neither the end-of-sequence token nor a matched stop sequence
is sent (tokens that may start one are held back until they cannot); max_tokens counts every generated
token, those included.
"""
from __future__ import annotations

import collections
import inspect
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import torch

from ..core import edits
from ..core.registry import method_for_config
from ..core.site import BASE_NAME
from . import kv as kvlib
from .requests import GenRequest, TokenEvent, check as _check

MIXED = ""  # the group key of all adapters that can share one batch (one adapter name per row)


class _Seq:
    """A running request: its cache, generated tokens and output queue."""

    def __init__(self, req: GenRequest, out: queue.Queue, name: str, key: str) -> None:
        self.req, self.out, self.name, self.key = req, out, name, key
        self.tokens: list[int] = []  # generated so far
        self.sent = 0  # tokens already sent (the rest may still be the start of a stop sequence)
        self.cache: kvlib.SeqKV | None = None
        self.extra = 0  # virtual positions at the front of the cache
        self.real = 0  # real tokens in the cache
        self.done = False
        self.cancelled = False  # set by Engine.cancel: ends at the next token boundary
        self.gen = torch.Generator() if req.temperature > 0 else None  # the request's own random stream
        if self.gen is not None:
            self.gen.seed() if req.seed is None else self.gen.manual_seed(req.seed)


class Engine:
    """Serves GenRequests on `model`'s loaded adapters with continuous batching."""

    def __init__(self, model, tokenizer=None, max_batch: int = 32, eos_ids: list[int] | None = None) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.eos_ids = list(eos_ids) if eos_ids is not None else self._default_eos()
        config = model.base_model.config
        self.vocab = getattr(config.get_text_config(), "vocab_size", None)
        if self.vocab is not None and not all(isinstance(t, int) and 0 <= t < self.vocab for t in self.eos_ids):
            raise ValueError(f"eos_ids must be token ids in [0, {self.vocab}), got {self.eos_ids}")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        params = inspect.signature(model.base_model.forward).parameters
        self._keep_one = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._exclusive: list[tuple[Callable[[], Any], Future]] = []
        self._running: list[_Seq] = []
        self._batches: dict[str, kvlib.Batch] = {}  # group key -> its running sequences' packed caches
        self._accepting, self._stopping, self._drain = True, False, True
        self._thread: threading.Thread | None = None
        self._keys: dict[str, tuple[str, bool]] = {}  # adapter -> (group key, acts on the inputs)
        self._stats = dict.fromkeys(("steps", "forwards", "prefill_forwards", "decode_forwards", "tokens",
                                     "finished", "cancelled", "errors"), 0)
        self._hist: collections.Counter[int] = collections.Counter()

    def _default_eos(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(self.model.base_model, "generation_config", None), "eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- public API -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the background scheduler thread (the model is put in eval mode)."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self.model.eval()
        self._active_at_start = self.model.active_adapters
        self.model._ctx.static_weights += 1
        self._thread = threading.Thread(target=self._loop, name="unipeft-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Refuse new requests; with `drain`, finish every accepted one first, else end them with an error."""
        with self._cond:
            self._accepting, self._stopping, self._drain = False, True, drain
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._thread is None:  # never started: nothing will serve the waiting requests
            self._abort_all("the engine was stopped before this request ran")

    def submit(self, req: GenRequest) -> "queue.Queue[TokenEvent]":
        """Queue a request (thread-safe); its events arrive on the returned queue until one is finished."""
        out: queue.Queue = queue.Queue()
        error = _check(req, self.vocab)
        if error is None and req.adapter is not None and req.adapter not in self.model.peft_config:
            error = self._unknown(req.adapter)
        with self._cond:
            if error is None and not self._accepting:
                error = "the engine is stopping and accepts no new requests"
            if error is not None:
                self._stats["errors"] += 1
                out.put(TokenEvent(None, True, None, error=error))
                return out
            self._waiting.append(_Seq(req, out, req.adapter or BASE_NAME, MIXED))
            self._cond.notify_all()
        return out

    def cancel(self, out: "queue.Queue[TokenEvent]") -> None:
        """End the request whose event queue is `out` at the next token boundary (thread-safe; its final event
        has reason "cancelled"; nothing happens if it already finished). Frees its batch slot at once, e.g.
        when a stop string matched on the text or the client went away."""
        with self._cond:
            for seq in (*self._waiting, *self._running):
                if seq.out is out:
                    seq.cancelled = True
            self._cond.notify_all()

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the scheduler thread between two steps; return its result or raise its exception."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return self._call(fn)
        done: Future = Future()
        with self._cond:
            self._exclusive.append((fn, done))
            self._cond.notify_all()
        return done.result()

    def stats(self) -> dict:
        """Counts so far: running, waiting, steps, forwards, tokens, finished and the decode batch sizes."""
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), **self._stats,
                    "batch_sizes": dict(sorted(self._hist.items()))}

    # ---- scheduler --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._exclusive or self._waiting or self._running or self._stopping):
                    self._cond.wait()
                jobs, self._exclusive = self._exclusive, []
                leaving = self._stopping and not jobs and (not self._drain or not (self._waiting or self._running))
            for fn, done in jobs:
                try:
                    done.set_result(self._call(fn))
                except BaseException as exc:  # handed to the caller of run_exclusive
                    done.set_exception(exc)
            if leaving:
                self._abort_all("the engine was stopped before this request finished")
                return self._restore_active()
            if jobs:
                self._keys.clear()  # adapters may have changed
                self._drop_unloaded()
            self._reap()
            try:
                with torch.no_grad():
                    self._prefill(self._admit())
                    self._decode()
            except Exception as exc:  # a bug must not leave requests waiting forever on a dead thread
                for seq in self._running:
                    self._fail(seq, f"engine error: {type(exc).__name__}: {exc}")
                self._batches.clear()
                self._retire()

    def _restore_active(self) -> None:
        """Give the model back the active adapters it had at start (those still loaded) and its weight checks."""
        self.model._ctx.static_weights -= 1
        names = [n for n in self._active_at_start if n in self.model.peft_config]
        if names != self.model.active_adapters:
            self.model.set_adapter(names)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run a job between steps; afterwards adapters may differ: caches are rebuilt, new ones run in eval."""
        try:
            return fn()
        finally:
            self._keys.clear()
            self.model.eval()
            self.model._ctx.version += 1  # with static_weights, the only sign that weights may have changed

    def _reap(self) -> None:
        """Finish cancelled requests, waiting or running."""
        with self._cond:
            gone = [s for s in (*self._waiting, *self._running) if s.cancelled and not s.done]
            if gone:
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        for seq in gone:
            self._finish(seq, seq.sent, "cancelled")
            with self._cond:
                self._stats["cancelled"] += 1
        if gone:
            self._retire()

    def _admit(self) -> list[_Seq]:
        """Move waiting requests into the running batch (up to max_batch); failed ones end at once."""
        new = []
        with self._cond:
            while self._waiting and len(self._running) + len(new) < self.max_batch:
                seq = self._waiting.popleft()
                if seq.req.adapter is not None and seq.req.adapter not in self.model.peft_config:
                    self._fail(seq, self._unknown(seq.req.adapter))
                    continue
                seq.key = self._group(seq.name)[0]
                new.append(seq)
            self._running.extend(new)
        return new

    def _group(self, name: str) -> tuple[str, bool]:
        """(group key, whether the adapter acts on the model inputs) of adapter `name`."""
        if name == BASE_NAME:
            return MIXED, False
        if name not in self._keys:
            model = self.model
            sites = list(model.sites())
            inputs = any(name in s.deltas and s.deltas[name].model_input for s in sites)
            mixes = method_for_config(model.peft_config[name]).capabilities.mixed_batch and not inputs
            if mixes:
                try:
                    edits.refuse_mixed(sites, name)
                except Exception:  # an init edited the base weights: it runs on its own
                    mixes = False
            self._keys[name] = (MIXED if mixes else name, inputs)
        return self._keys[name]

    @staticmethod
    def _groups(seqs: list[_Seq]) -> dict[str, list[_Seq]]:
        groups: dict[str, list[_Seq]] = {}
        for seq in seqs:
            groups.setdefault(seq.key, []).append(seq)
        return groups

    def _prefill(self, new: list[_Seq]) -> None:
        """Run the new prompts, left-padded, one forward per group (at most max_batch rows)."""
        for key, seqs in self._groups(new).items():
            ids, mask, positions = kvlib.left_pad([s.req.prompt_ids for s in seqs], self.pad_id)
            out = self._forward(key, seqs, ids, mask, positions, kvlib.DynamicCache(), "prefill")
            if out is None:
                continue
            logits, cache = out
            extra = cache.get_seq_length() - ids.shape[1]  # virtual tokens the adapter put in front
            pads = [ids.shape[1] - len(s.req.prompt_ids) for s in seqs]
            for seq, row in zip(seqs, kvlib.unpack(cache, pads, extra)):
                seq.cache, seq.extra, seq.real = row, extra, len(seq.req.prompt_ids)
            self._emit(seqs, logits)

    def _decode(self) -> None:
        """One decode step: one forward per group over all running sequences (caches stay packed)."""
        running = [s for s in self._running if not s.done]
        groups = self._groups(running)
        for key in list(self._batches):  # rows of finished or regrouped sequences leave their batch first
            self._batches[key].fit(groups.get(key, []))
            if key not in groups:
                del self._batches[key]
        if not running:
            return
        self._stats["steps"] += 1
        for key, seqs in groups.items():
            batch = self._batches.setdefault(key, kvlib.Batch(seqs[0].extra))
            cache, mask = batch.take(seqs)
            ids = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long)
            positions = torch.tensor([[s.real] for s in seqs], dtype=torch.long)
            with self._cond:
                self._hist[len(seqs)] += 1
            out = self._forward(key, seqs, ids, mask, positions, cache, "decode")
            if out is None:
                batch.clear()
                continue
            logits, cache = out
            batch.keep(cache)
            for seq in seqs:
                seq.real += 1
            self._emit(seqs, logits)

    def _forward(self, key: str, seqs: list[_Seq], ids, mask, positions, cache, kind: str):
        """(last-position logits, cache) of one group's forward; on an error the group's requests end."""
        model = self.model
        names = [s.name for s in seqs] if key == MIXED else None
        try:
            if names is not None:
                # Rows name their adapters; no adapter is active, so no init's base-weight edit is held.
                if model.active_adapters or model._ctx.composition is not None:
                    model.set_adapter([])
            else:
                if model.active_adapters != [key] or model._ctx.composition is not None:
                    model.set_adapter(key)
                if self._group(key)[1]:
                    positions = None  # prompt methods: positions follow the cache (as in their generation)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, adapter_names=names, **self._keep_one)
        except Exception as exc:  # the model refused this batch: its requests end, the engine goes on
            for seq in seqs:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
            return None
        with self._cond:
            self._stats["forwards"] += 1
            self._stats[f"{kind}_forwards"] += 1
        new = getattr(out, "past_key_values", None)
        return out.logits[:, -1].float(), (new if new is not None else cache)

    # ---- tokens -------------------------------------------------------------------------------
    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits):
            if not seq.done:
                self._advance(seq, self._pick(seq, row))
        self._retire()

    def _pick(self, seq: _Seq, logits: torch.Tensor) -> int:
        """The next token: greedy at temperature 0, else temperature + top_p with the request's generator."""
        req = seq.req
        if self.eos_ids and len(seq.tokens) < req.min_tokens:
            logits = logits.clone()
            logits[self.eos_ids] = float("-inf")
        if req.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest top set whose mass reaches top_p (the likeliest token always stays).
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= req.top_p
            probs = probs.index_fill(0, order[drop], 0)
        return int(torch.multinomial(probs, 1, generator=seq.gen))

    def _advance(self, seq: _Seq, token: int) -> None:
        """Record `token`, send what is certain, end the request on eos, a stop sequence or max_tokens."""
        req, toks = seq.req, seq.tokens
        toks.append(token)
        with self._cond:
            self._stats["tokens"] += 1
        if token in self.eos_ids:
            return self._finish(seq, len(toks) - 1, "stop")
        for stop in req.stop_ids:
            if toks[-len(stop):] == stop:
                return self._finish(seq, len(toks) - len(stop), "stop")
        if len(toks) >= req.max_tokens:
            return self._finish(seq, len(toks), "length")
        hold = max((k for stop in req.stop_ids for k in range(1, min(len(stop), len(toks) + 1))
                    if toks[-k:] == stop[:k]), default=0)
        self._send(seq, len(toks) - hold)

    def _send(self, seq: _Seq, upto: int) -> None:
        for token in seq.tokens[seq.sent:upto]:
            seq.out.put(TokenEvent(token, False, None))
        seq.sent = max(seq.sent, upto)

    def _finish(self, seq: _Seq, upto: int, reason: str) -> None:
        self._send(seq, upto)
        seq.out.put(TokenEvent(None, True, reason))
        seq.done, seq.cache = True, None
        with self._cond:
            self._stats["finished"] += 1

    def _fail(self, seq: _Seq, error: str) -> None:
        if not seq.done:
            seq.out.put(TokenEvent(None, True, None, error=error))
            seq.done, seq.cache = True, None
            with self._cond:
                self._stats["errors"] += 1

    def _retire(self) -> None:
        with self._cond:
            self._running = [s for s in self._running if not s.done]

    def _drop_unloaded(self) -> None:
        for seq in self._running:
            if seq.req.adapter is not None and seq.req.adapter not in self.model.peft_config:
                self._fail(seq, f"adapter '{seq.req.adapter}' was unloaded while this request ran")
            elif not seq.done:
                seq.key = self._group(seq.name)[0]
        self._retire()

    def _abort_all(self, error: str) -> None:
        with self._cond:
            seqs = list(self._waiting) + self._running
            self._waiting.clear()
        for seq in seqs:
            self._fail(seq, error)
        self._batches.clear()
        self._retire()

    def _unknown(self, name: str) -> str:
        return f"adapter: '{name}' is not loaded; loaded adapters: {sorted(self.model.peft_config)}"
