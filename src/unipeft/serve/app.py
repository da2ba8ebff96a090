"""The HTTP server: OpenAI-compatible completions and chat, runtime adapters, health and Prometheus metrics.

`create_app` wires a model, its tokenizer and a started-on-startup Engine into a FastAPI app. Requests
are validated here (errors are JSON naming the field, see api.py), turned into token ids, and submitted
to the engine, which batches them across adapters; a pump thread per request forwards the engine's
token events to the event loop, so a thousand waiting requests cost no polling.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..train.generate import TextStream, context_length
from .api import AdapterRequest, ApiError, ChatRequest, ClassifyRequest, CompletionRequest, read_body
from .engine import GenRequest
from .metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from .registry import AdapterRegistry

STATIC = Path(__file__).parent / "static"
def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class Server:
    """The state behind the routes: model, tokenizer, engine, adapters and metrics."""

    def __init__(self, model, tokenizer, engine, max_adapters: int, model_name: str, task: str,
                 adapter_paths: dict[str, str] | None):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.model_name, self.task, self.created = model_name, task, int(time.time())
        self.metrics = Metrics()
        self.registry = AdapterRegistry(model, engine.run_exclusive, max_adapters, model_name)
        for name, path in (adapter_paths or {}).items():
            self.registry.adopt(name, path)
        self.context = context_length(model)
        self.vocab = _vocab_size(model)
        self.eos = set(getattr(engine, "eos_ids", None) or [])
        self.pumps = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="unipeft-pump")

    # -- prompts -------------------------------------------------------------------------------------------
    def completion_ids(self, req: CompletionRequest) -> list[int]:
        """Token ids of a completion prompt: [bos] text as training encodes it, or the ids as given."""
        if isinstance(req.prompt, str):
            from ..data.encode import encode_prompt_completion

            ids = encode_prompt_completion(self.tokenizer, req.prompt, None, 10 ** 9, False)[0]
        else:
            ids = list(req.prompt)
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab})", "prompt")
        if not ids:
            raise ApiError(400, "prompt: the prompt is empty (no tokens)", "prompt")
        return ids

    def chat_ids(self, req: ChatRequest) -> list[int]:
        """Token ids of the messages rendered through the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"messages: the tokenizer of model {self.model_name!r} has no chat template; use "
                                f"/v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages],
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template itself refuses these messages (roles, order)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def budget(self, req, ids: list[int], field: str) -> int:
        """max_tokens checked against the context (None: whatever fits); min_tokens against max_tokens."""
        room = None if self.context is None else self.context - len(ids)
        if room is not None and room < 1:
            raise ApiError(400, f"{field}: the prompt has {len(ids)} tokens but model {self.model_name!r} has a "
                                f"context of {self.context} positions; shorten it", field)
        max_tokens = req.max_tokens if req.max_tokens is not None else room or 16
        if room is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: "
                                f"{len(ids) + max_tokens} > the context of {self.context} positions of model "
                                f"{self.model_name!r}; at most {room} new tokens fit", "max_tokens")
        if req.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens: {req.min_tokens} is more than max_tokens {max_tokens}", "min_tokens")
        return max_tokens

    # -- generation ----------------------------------------------------------------------------------------
    async def generate(self, req, ids: list[int], max_tokens: int) -> AsyncIterator[tuple[str, dict]]:
        """Run one request: yields ("text", chunk) pieces, then ("end", {finish_reason, tokens})."""
        adapter = await run_in_threadpool(self.registry.acquire, req.model)
        stops = req.stops()
        # Stop strings are matched on the text (as offline generation does): a stop string's own token ids
        # may differ from those the model generates for it, and the text before it keeps its exact spacing.
        gen = GenRequest(prompt_ids=ids, adapter=adapter, max_tokens=max_tokens, temperature=float(req.temperature),
                         top_p=float(req.top_p), seed=req.seed, min_tokens=req.min_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            q = self.engine.submit(gen)
        except Exception as exc:
            self.registry.release(adapter)
            raise ApiError(503, f"the server is not accepting requests: {exc}", None, "server_error") from None
        self.pumps.submit(self._pump, q, loop, events, adapter)
        pieces: list[str] = []
        stream = TextStream(self.tokenizer, stops, pieces.append)
        try:
            async for item in self._follow(events, stream, pieces, [], ids, req.model or self.model_name):
                yield item
        finally:  # a stop string matched on the text, or the client went away: the batch slot is freed now
            self.engine.cancel(q)

    async def _follow(self, events, stream, pieces, tokens, ids, model) -> AsyncIterator[tuple[str, dict]]:
        """The text pieces and the end of one request from its engine events."""
        reason = None
        while True:
            ev = await events.get()
            if ev.error:
                raise ApiError(400, f"generation failed: {ev.error}", None, "server_error")
            if ev.token_id is not None and ev.token_id not in self.eos and not stream.done:
                tokens.append(ev.token_id)
                if stream.update(tokens):
                    reason = "stop"
            if ev.finished:
                stream.update(tokens, final=True)
                reason = reason or ev.finish_reason or "length"
            for piece in pieces:
                yield "text", piece
            pieces.clear()
            if reason is not None:
                self.metrics.tokens(len(ids), len(tokens), model)
                yield "end", {"finish_reason": reason, "completion_tokens": len(tokens), "text": stream.text}
                return

    def classify(self, texts: list[str], adapter: str | None) -> tuple[list[dict], int]:
        """Label and per-label probabilities of each text (one forward between two engine steps)."""
        import torch

        from ..core.site import BASE_NAME

        batch = self.tokenizer(texts, truncation=True, max_length=self.context or 512, padding=True,
                               return_tensors="pt")
        labels = dict(getattr(self.model.config, "id2label", None) or {})

        @torch.no_grad()
        def forward():
            device = next(self.model.parameters()).device
            inputs = {k: v.to(device) for k, v in batch.items()}
            return self.model(**inputs, adapter_names=[adapter or BASE_NAME] * len(texts)).logits.softmax(-1).cpu()

        probs = self.registry.run(forward)
        rows = []
        for i, p in enumerate(probs.tolist()):
            names = [str(labels.get(j, f"LABEL_{j}")) for j in range(len(p))]
            best = max(range(len(p)), key=p.__getitem__)
            rows.append({"index": i, "label": names[best], "score": p[best], "probabilities": dict(zip(names, p))})
        return rows, int(batch["attention_mask"].sum())

    def _pump(self, q: "queue.Queue", loop, events: asyncio.Queue, adapter: str | None) -> None:
        """Forward a request's engine events to the loop until it finishes; then unpin its adapter."""
        try:
            while True:
                ev = q.get()
                loop.call_soon_threadsafe(events.put_nowait, ev)
                if ev.finished or ev.error:
                    return
        finally:
            self.registry.release(adapter)


def _vocab_size(model) -> int:
    """Rows of the input embedding (token ids at or above are refused)."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2 ** 31)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _respond(srv: Server, req, ids: list[int], chat: bool) -> Response:
    """The JSON response, or with `stream` the SSE stream of chunks ending in `data: [DONE]`."""
    max_tokens = srv.budget(req, ids, "messages" if chat else "prompt")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    kind = "chat.completion" if chat else "text_completion"
    model = req.model or srv.model_name
    head = {"id": rid, "created": int(time.time()), "model": model}
    parts = srv.generate(req, ids, max_tokens)
    if not req.stream:
        async for what, value in parts:
            if what == "end":
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": value["text"]},
                              "finish_reason": value["finish_reason"]}
                else:
                    choice = {"index": 0, "text": value["text"], "logprobs": None,
                              "finish_reason": value["finish_reason"]}
                return JSONResponse({**head, "object": kind, "choices": [choice],
                                     "usage": _usage(len(ids), value["completion_tokens"])})
    first = await parts.__anext__()  # errors before the first token are still a 4xx JSON response
    obj = f"{kind}.chunk" if chat else kind

    def chunk(text: str | None, reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {**head, "object": obj, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        return {**head, "object": obj, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                    "finish_reason": reason}]}

    async def events() -> AsyncIterator[str]:
        if chat:
            yield _sse({**head, "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                            "finish_reason": None}]})
        item = first
        while True:
            what, value = item
            if what == "text":
                yield _sse(chunk(value, None))
            else:
                end = chunk(None, value["finish_reason"])
                end["usage"] = _usage(len(ids), value["completion_tokens"])
                yield _sse(end)
                yield "data: [DONE]\n\n"
                return
            try:
                item = await parts.__anext__()
            except ApiError as exc:  # the status line is sent already: the error is the stream's last event
                yield _sse(exc.body())
                yield "data: [DONE]\n\n"
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, engine, *, max_adapters: int = 8, model_name: str = "base", task: str = "causal_lm",
               adapter_paths: dict[str, str] | None = None) -> FastAPI:
    """The FastAPI app; the engine is started on startup and drained on shutdown. `adapter_paths` names the
    folders of adapters already loaded into `model` (so they can be evicted and reloaded)."""
    if task not in ("causal_lm", "classify"):
        raise ValueError(f"task must be 'causal_lm' or 'classify', got {task!r}")
    srv = Server(model, tokenizer, engine, max_adapters, model_name, task, adapter_paths)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight responses by now; the engine finishes what is left
            await run_in_threadpool(engine.stop, True)
            srv.pumps.shutdown(wait=False)

    app = FastAPI(title="unipeft serve", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    app.add_exception_handler(ApiError, lambda _r, exc: _error(exc))

    async def http_error(_r, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(exc.status_code, str(exc.detail), None, kind))

    async def server_error(_r, exc: Exception):
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)

    def need(kind: str) -> None:
        if srv.task != kind:
            what = "a causal LM (completions, chat)" if srv.task == "causal_lm" else "a sequence classifier"
            raise ApiError(400, f"model: this server runs {what}; this endpoint needs a {kind} model", "model")

    @app.post("/v1/completions")
    async def completions(request: Request):
        need("causal_lm")
        req = await read_body(request, CompletionRequest)
        return await _respond(srv, req, srv.completion_ids(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        need("causal_lm")
        req = await read_body(request, ChatRequest)
        return await _respond(srv, req, srv.chat_ids(req), chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request):
        need("classify")
        req = await read_body(request, ClassifyRequest)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise ApiError(400, "input: no texts to classify", "input")
        adapter = await run_in_threadpool(srv.registry.acquire, req.model)
        try:
            rows, n_tokens = await run_in_threadpool(srv.classify, texts, adapter)
        finally:
            srv.registry.release(adapter)
        return {"object": "list", "model": req.model or srv.model_name, "data": rows,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.get("/v1/models")
    async def models():
        reg = srv.registry
        rows = [{"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "unipeft",
                 "root": srv.model_name, "parent": None}]
        rows += [{"id": n, "object": "model", "created": srv.created, "owned_by": "unipeft", "root": srv.model_name,
                  "parent": srv.model_name, "resident": n in reg.resident,
                  "path": None if reg.paths[n] is None else str(reg.paths[n])} for n in reg.names()]
        return {"object": "list", "data": rows}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        req = await read_body(request, AdapterRequest)
        await run_in_threadpool(srv.registry.register, req.name, req.path)
        return {"object": "adapter", "name": req.name, "path": req.path, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await run_in_threadpool(srv.registry.unregister, name)
        return {"object": "adapter", "name": name, "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_name, "task": srv.task, "adapters": srv.registry.names()}

    @app.get("/metrics")
    async def metrics():
        reg = srv.registry
        counts = {"registered": len(reg.paths), "resident": len(reg.resident), "loads_total": reg.loads,
                  "evictions_total": reg.evictions}
        return Response(srv.metrics.render(engine.stats(), counts), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise ApiError(404, "no page at /: the API is under /v1", None, "not_found_error")
        return FileResponse(page)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def empty_adapted(base):
    """An AdaptedModel over `base` holding no adapter yet (adapters are loaded at runtime)."""
    from ..core.model import AdaptedModel
    from ..core.registry import get_method

    placeholder = "__unipeft_serve_placeholder__"
    model = AdaptedModel(base, get_method("lora").config_cls(r=1, target_modules="all-linear"), placeholder)
    model.delete_adapter(placeholder)
    return model.eval()


def load_model(spec: str, task: str = "causal_lm") -> tuple[Any, Any, str, str, dict[str, str | None]]:
    """(model, tokenizer, base name, task, adapter folders) for `--model`: 'smollm2', a local model folder or a
    finished run folder (its adapter is served as 'default'); the model is an AdaptedModel in eval mode."""
    from ..core.errors import ConfigError
    from ..core.model import AdaptedModel
    from ..train.artifacts import load_run
    from ..train.config import ModelConfig
    from ..train.models import load_base_model, load_tokenizer, model_path
    from ..train.run import SUMMARY
    from ..train.strategy import ADAPTER_DIR

    src = Path(spec).expanduser()
    if (src / SUMMARY).is_file():
        run = load_run(src)
        if not isinstance(run.model, AdaptedModel):
            raise ConfigError(f"--model: run {src} keeps full weights, not an adapter; serve needs an adapter run")
        task = "causal_lm" if run.cfg.task == "causal_lm" else "classify"
        folder = src / ADAPTER_DIR
        return run.model.eval(), run.tokenizer, run.cfg.model.name, task, {
            n: str(folder) if n == "default" and folder.is_dir() else None for n in run.model.peft_config}
    tokenizer = load_tokenizer(spec)
    if task == "classify":
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(str(model_path(spec))).eval()
    else:
        base = load_base_model(ModelConfig(name=spec), "causal_lm", [], 0)
    return empty_adapted(base), tokenizer, spec, task, {}
