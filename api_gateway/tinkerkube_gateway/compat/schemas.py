"""Request bodies of the OpenAI- and Anthropic-compatible endpoints, with a bound on every field.

Every number that reaches the sampler is bounded here (finite floats, integer ranges, list sizes), so bad
input is a 400 before any session or sampler is touched. Unknown fields are ignored (clients add new ones
all the time); known fields this server cannot honour (tools, images, penalties, logit_bias, ...) are
refused with a message naming them, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tinkerkube_contract.pod_api import MAX_TEXT_ITEMS

MAX_CHOICES = 128  # n, and n x prompts for /completions
MAX_TOKENS = 1_000_000  # the context length bounds it further, per model
MAX_STOPS = 16
MAX_STOP_CHARS = 1000
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 1_000_000
INT64 = 2**63

Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOP_K)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def stops_of(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` (one string or a list) as a tuple without empty strings (they would match at once)."""
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _refuse(name: str, why: str = "is not supported by this server") -> ValueError:
    return ValueError(f"{name} {why}")


# ------------------------------------------------------------------------------------------------ OpenAI


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: str
    text: str | None = None


class OpenAIMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if self.role in ("tool", "function") or self.tool_calls:
            raise _refuse("tool and function messages")
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise _refuse(f"content parts of type {part.type!r}", "are not supported (text only)")
        return "".join(p.text or "" for p in self.content)

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class _OpenAISampling(_Body):
    model: str = Field(min_length=1, max_length=1000)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1  # vLLM's extension; -1 or 0: off
    seed: Seed | None = None
    stop: StopText | list[StopText] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value

    @model_validator(mode="after")
    def _supported(self) -> _OpenAISampling:
        if self.presence_penalty or self.frequency_penalty:
            raise _refuse("presence_penalty and frequency_penalty", "must be 0 (penalties are not supported)")
        if self.logit_bias:
            raise _refuse("logit_bias")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise _refuse("response_format other than text")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools or self.functions:
            raise _refuse("tools and functions")
        if self.tool_choice not in (None, "none"):
            raise _refuse("tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        for message in self.messages:
            message.text()  # refuses tool turns and non-text parts now, as a 400
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_OpenAISampling):
    prompt: Prompt
    max_tokens: MaxTokens | None = 16  # OpenAI's default for /completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.suffix:
            raise _refuse("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise _refuse("best_of other than n")
        prompts = self.prompts()
        if not prompts or len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"between 1 and {MAX_CHOICES} prompts x n, got {len(prompts)} x {self.n}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty")
        if self.echo and self.stream:
            raise _refuse("echo with stream")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: texts to encode, or token ids as given."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ Anthropic


class AnthropicBlock(_Body):
    type: str
    text: str | None = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]

    def text(self) -> str:
        return blocks_text(self.content, f"{self.role} content")


def blocks_text(content: str | list[AnthropicBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    for block in content:
        if block.type != "text" or block.text is None:
            raise _refuse(f"{where} blocks of type {block.type!r}", "are not supported (text only)")
    return "".join(b.text or "" for b in content)


class MessagesRequest(_Body):
    model: str = Field(min_length=1, max_length=1000)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    max_tokens: MaxTokens
    system: str | list[AnthropicBlock] | None = None
    stop_sequences: list[StopText] | None = Field(None, max_length=MAX_STOPS)
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] | None = None
    stream: bool = False
    tools: list[Any] | None = None
    thinking: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> MessagesRequest:
        if self.tools:
            raise _refuse("tools")
        if self.thinking and self.thinking.get("type") == "enabled":
            raise _refuse("extended thinking")
        for message in self.messages:
            message.text()
        if self.system is not None:
            blocks_text(self.system, "system")
        return self

    def system_text(self) -> str | None:
        return None if self.system is None else blocks_text(self.system, "system")


class CountTokensRequest(_Body):
    model: str = Field(min_length=1, max_length=1000)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    system: str | list[AnthropicBlock] | None = None

    def system_text(self) -> str | None:
        return None if self.system is None else blocks_text(self.system, "system")
