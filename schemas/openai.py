"""OpenAI wire types, as msgspec Structs.

Requests are decoded straight into these types, so a wrong type or an unknown field becomes a
`msgspec.ValidationError` that the ingress turns into OpenAI's 400 error naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct


class TextPart(Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class FunctionCall(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's)


class ToolCall(Struct, forbid_unknown_fields=True):
    """A call the model made: in an answer, and in the history of the next request."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Union[str, None] = None
    tool_calls: Union[list[ToolCall], None] = None  # an assistant's calls
    tool_call_id: Union[str, None] = None  # a tool message: the call it answers


class FunctionDefinition(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # as OpenAI's
    description: Union[str, None] = None
    parameters: Union[dict[str, Any], None] = None  # a JSON Schema of the arguments; None: no arguments
    strict: Union[bool, None] = None  # a forced call always matches its schema (workers/tools.py)


class Tool(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    # vLLM's: usage in every chunk. Accepted (clients built for vLLM send it); usage comes in the last chunk only.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # as OpenAI's
    schema: Union[dict[str, Any], None] = None  # None: any JSON object
    strict: Union[bool, None] = None  # Conclave always constrains the answer to the schema
    description: Union[str, None] = None


class ResponseFormat(Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Union[JsonSchemaFormat, None] = None


class SamplingFields(Struct, forbid_unknown_fields=True, kw_only=True):
    """The generation controls both endpoints accept. `None` means: not given by the client."""

    model: str
    max_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    min_p: Union[float, None] = None
    seed: Union[int, None] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    n: int = 1
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    repetition_penalty: Union[float, None] = None
    logit_bias: Union[dict[str, float], None] = None
    logprobs: Union[bool, int, None] = None
    user: Union[str, None] = None
    # Accepted as OpenAI accepts them, and without effect on the answer: routing and caching hints and tags that
    # current SDKs and tools send (README: API).
    service_tier: Union[Literal["auto", "default", "flex", "scale", "priority"], None] = None
    prompt_cache_key: Union[str, None] = None
    safety_identifier: Union[str, None] = None


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Union[int, None] = None
    top_logprobs: Union[int, None] = None
    response_format: Union[ResponseFormat, None] = None
    tools: Union[list[Tool], None] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Union[bool, None] = None
    metadata: Union[dict[str, str], None] = None
    store: Union[bool, None] = None
    modalities: Union[list[str], None] = None  # only ["text"]: Conclave's models write text
    reasoning_effort: Union[str, None] = None  # refused: no model served here reasons on demand


class CompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    # A string, a list of token ids, or a one-element list of strings (msgspec allows one list type per union).
    prompt: Union[str, list[Union[str, int]]]
    echo: bool = False
    suffix: Union[str, None] = None
    best_of: Union[int, None] = None


class PromptTokensDetails(Struct):
    cached_tokens: int = 0  # prompt tokens whose KV cache came from the prefix cache, not a prefill


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorDetail(Struct):
    message: str
    type: str
    param: Union[str, None] = None
    code: Union[str, None] = None


class ErrorResponse(Struct):
    error: ErrorDetail


# --- responses -------------------------------------------------------------------------------


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: Union[list[int], None]


class TokenLogprob(Struct):
    """One generated token's log probability and the most likely alternatives at its place (OpenAI's chat shape)."""

    token: str
    logprob: float
    bytes: Union[list[int], None]
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Struct):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(Struct):
    """The legacy completions shape: parallel lists, the alternatives as {token: logprob}."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(Struct, omit_defaults=True):
    role: Literal["assistant"]  # without a default: always written
    content: Union[str, None]  # None (null) when the answer is only tool calls, as OpenAI's
    tool_calls: Union[list[ToolCall], None] = None  # left out when there are none, as OpenAI's


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: Union[ChatLogprobs, None] = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: Union[str, None] = None


class FunctionDelta(Struct, omit_defaults=True):
    name: Union[str, None] = None
    arguments: Union[str, None] = None


class ToolCallDelta(Struct, omit_defaults=True):
    """A streamed call: the first delta of call `index` brings its id, type and name, the next its arguments."""

    index: int
    id: Union[str, None] = None
    type: Union[str, None] = None
    function: Union[FunctionDelta, None] = None


class ChunkDelta(Struct, omit_defaults=True):
    role: Union[str, None] = None
    content: Union[str, None] = None
    tool_calls: Union[list[ToolCallDelta], None] = None


class ChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    finish_reason: Union[str, None] = None
    logprobs: Union[ChatLogprobs, None] = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Union[Usage, None] = None
    system_fingerprint: Union[str, None] = None


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: Union[str, None] = None
    logprobs: Union[CompletionLogprobs, None] = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Union[Usage, None] = None
    object: str = "text_completion"
    system_fingerprint: Union[str, None] = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "conclave"
    object: str = "model"
    context_length: Union[int, None] = None
    # Conclave's: loaded, loading, unloading, or idle (in the cluster's catalogue, loaded by the first request)
    status: str = "loaded"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


