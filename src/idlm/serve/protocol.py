"""The OpenAI request bodies idlm accepts, checked strictly: a field idlm cannot honour is a 400 naming it.

Pydantic checks types and ranges; `check_fields` refuses the OpenAI fields idlm does not implement (tools,
response formats other than text, logit_bias, ...) unless they are null or their no-op value, and any field
OpenAI does not define either. Nothing is ignored silently except `user` (OpenAI's own advice: an opaque id).
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from idlm.decoding.sampling import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    """An error the client caused or must see, as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI fields idlm does not implement, with the value(s) that mean "not used" (accepted as such).
UNSUPPORTED: dict[str, Any] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},), "logit_bias": ({},),
    "best_of": (1,), "echo": (False,), "suffix": ("",), "modalities": (["text"],), "audio": (),
    "prediction": (), "reasoning_effort": (), "web_search_options": (), "store": (False,), "metadata": (),
    "service_tier": ("auto", "default"), "verbosity": (), "prompt_cache_key": (), "safety_identifier": (),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(BaseModel):
    """Fields both endpoints share (OpenAI's, then idlm's extras)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # idlm / vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    decoding: Literal["auto", "ar", "isd", "risd"] | None = None
    stride: int | None = Field(None, ge=1, le=16)

    def check_fields(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if value is None:
                continue
            if name not in UNSUPPORTED:
                raise ApiError(400, f"unrecognized request argument: {name}", param=name)
            if value not in UNSUPPORTED[name]:
                raise ApiError(400, f"{name} is not supported by idlm", param=name, code="unsupported_parameter")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ApiError(400, "stop takes at most 4 sequences", param="stop")

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """Choice i of n draws with seed + i (unseeded: a fresh seed per choice)."""
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0, min_p=self.min_p or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                seed=None if self.seed is None else self.seed + choice, stop=self.stop, max_tokens=max_tokens,
                ignore_eos=self.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise ApiError(400, str(e)) from e


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def parse(model: type[Sampling], body: Any) -> Sampling:
    """A request body -> the checked request, or ApiError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{loc}: {err['msg']}", param=str(err["loc"][0]) if err["loc"] else None) from None
    req.check_fields()
    return req
