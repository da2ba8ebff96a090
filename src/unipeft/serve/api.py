"""Request models of the HTTP API (OpenAI's JSON shapes) and the one error type every endpoint answers with.

Every refusal is `{"error": {"message", "type", "param"}}` with a 4xx status; `param` names the request
field at fault so a client can point at it.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = Union[StrictInt, StrictFloat]


class ApiError(Exception):
    """A refused request: HTTP status, message, OpenAI error type and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


class _Request(BaseModel):
    # Unknown OpenAI fields (user, n=1, logit_bias, ...) are ignored rather than refused, as OpenAI clients
    # send some by default.
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    """The decoding fields shared by completions and chat completions."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    min_tokens: StrictInt = Field(default=0, ge=0)
    stream: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        """The stop strings as a list (OpenAI accepts one string or up to 4)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop: at most 4 stop sequences, got {len(stops)}", "stop")
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    """POST /v1/completions: `prompt` is a text or a list of token ids."""

    prompt: StrictStr | list[StrictInt]


class ChatMessage(_Request):
    """One chat turn."""

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: the messages are rendered through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(_Request):
    """POST /v1/classify: one text or a list of texts, classified by a sequence classifier."""

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr]


class AdapterRequest(_Request):
    """POST /v1/adapters: register an adapter folder under a name."""

    name: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: StrictStr = Field(min_length=1)


def _field(loc: tuple) -> str:
    """The dotted field path of a pydantic error location (messages.0.content)."""
    parts = [str(p) for p in loc if p not in ("body",) and not str(p).startswith(("function-", "json-"))]
    # pydantic's union branches add the branch type to the location (prompt.str, prompt.list[int]); drop it
    kept = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(kept) or "body"


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """Validate a decoded JSON body into `model`, or raise ApiError naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _field(tuple(err["loc"]))
        if err["type"] == "missing":
            raise ApiError(400, f"{field}: this field is required", field) from None
        got = err.get("input")
        got = f" (got {type(got).__name__} {got!r:.60})" if got is not None and err["type"] != "extra_forbidden" else ""
        raise ApiError(400, f"{field}: {err['msg']}{got}", field) from None


async def read_body(request, model: type[BaseModel]) -> Any:
    """The request's JSON body validated into `model` (ApiError on malformed JSON or a bad field)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None) from None
    return parse(model, data)
