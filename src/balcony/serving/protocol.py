"""The request bodies of /v1/completions and /v1/chat/completions: OpenAI's fields, field for field.

Every field OpenAI documents is accepted, at its default always; a value this server cannot honour
(a JSON response format, tool calls, audio, a suffix, stored completions, ...) is refused naming
the field and what is supported. Types are strict: no string where a number belongs, no number
where a bool does. Beside OpenAI's fields: vLLM's sampling extensions (`ignore_eos`, `min_tokens`,
`repetition_penalty`, `top_k`) and balcony's depth fields (`exit_layer`, `budget`,
`max_ms_per_token`). pydantic is imported only when a server is made (`api.create_app`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20  # what OpenAI's chat route and vLLM allow
MAX_STOP = 4

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # what torch's generators take
TokenIds = Annotated[list[int], Field(min_length=1)]


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


def _only(value, allowed: tuple, what: str):
    if value not in allowed:
        raise unsupported(f"{value!r} is not supported; {what}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: the usage so far in every chunk (guidellm asks for it)
    include_obfuscation: bool | None = None  # obfuscation pads chunks against side channels: nothing to pad here


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        return _only(value, ("text",), "only {'type': 'text'} is")


class _Common(_Strict):
    model: str | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    user: str | None = None
    # vLLM's extensions
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence (load tests)
    min_tokens: Annotated[int, Field(ge=0)] = 0  # no end-of-sequence before this many tokens
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: no top-k
    # balcony's own: one of these picks the depth
    exit_layer: int | Literal["full"] | None = None
    budget: float | None = None  # (0, 1] and max_ms_per_token > 0: checked by the depth policy
    max_ms_per_token: float | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value):
        if value and not all(key.isascii() and key.isdigit() for key in value):  # "²".isdigit(), but int("²") fails
            raise unsupported("logit_bias keys must be token ids (decimal strings)")
        return value


class CompletionBody(_Common):
    # text, or token ids (OpenAI's API and vLLM take both), or a list of prompts: n choices each
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 with echo: score the prompt alone
    best_of: Annotated[int, Field(ge=1)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info: ValidationInfo):
        n = info.data.get("n") or 1
        if value is not None and value != n:
            raise unsupported(f"best_of must equal n ({n}): candidates are not ranked here")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise unsupported("suffix (insertion) is not supported; only a null or empty suffix is")
        return value


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        return _only(value, ("text",), "only 'text' content parts are")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id, refusal, ...: not read
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatBody(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = Field(default=None, validate_default=True)
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: Literal["none", "auto"] | dict | None = Field(default=None, validate_default=True)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise unsupported("top_logprobs needs logprobs: true")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_calls(cls, value, info: ValidationInfo):
        offered = info.data.get("tools" if info.field_name == "tool_choice" else "functions")
        # OpenAI's default with tools offered is "auto"; "required" or a named tool must call one
        if (offered and value != "none") or value == "required" or isinstance(value, dict):
            raise unsupported(f"tool calling is not supported; send {info.field_name} 'none' or no tools")
        return value

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value):
        return _only(value, (None, False), "completions are not stored here")

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, value):
        return _only(value, (None, "auto", "default"), "this server has one tier: 'auto' or 'default'")

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value):
        return _only(value, (None, ["text"]), "only ['text'] output is")

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _absent(cls, value, info: ValidationInfo):
        return _only(value, (None,), f"{info.field_name} is not supported here")

    @field_validator("reasoning_effort", "verbosity")
    @classmethod
    def _medium(cls, value, info: ValidationInfo):
        return _only(value, (None, "medium"), f"{info.field_name} has one level here, 'medium' (the default)")
