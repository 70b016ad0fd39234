"""Anthropic's Messages API wire types (`POST /v1/messages`), as msgspec Structs: what the `anthropic` SDK sends and
reads. The ingress translates them onto the same jobs as OpenAI's (ingress/anthropic.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct


# Content blocks ignore fields they do not know: a client sends an answer's blocks back as it got them (the SDK's
# `model_dump()`), with fields that only answers carry (`citations`, `caller`, ...). The request's own fields are
# strict.
class TextBlock(Struct, tag="text", tag_field="type"):
    text: str


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: bool = False


class ImageBlock(Struct, tag="image", tag_field="type"):
    """Decoded so that it can be refused by name: the models served here read text only."""

    source: dict[str, Any]


Block = Union[TextBlock, ToolUseBlock, ToolResultBlock, ImageBlock]


class InputMessage(Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class AnthropicTool(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    input_schema: dict[str, Any]
    description: Union[str, None] = None
    type: Union[Literal["custom"], None] = None
    cache_control: Union[dict[str, Any], None] = None


class ToolChoice(Struct, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: Union[str, None] = None  # type "tool"
    disable_parallel_tool_use: bool = False


class Metadata(Struct, forbid_unknown_fields=True):
    user_id: Union[str, None] = None


class JsonOutputFormat(Struct, forbid_unknown_fields=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(Struct, forbid_unknown_fields=True):
    format: Union[JsonOutputFormat, None] = None  # structured output: the answer is JSON matching the schema
    effort: Union[str, None] = None  # refused: no model served here reasons on demand


class MessagesRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    max_tokens: int
    messages: list[InputMessage]
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: Union[list[str], None] = None
    stream: bool = False
    # 0 to 1 in this API. Anthropic's current SDK no longer offers these three (send them in `extra_body`); older
    # SDKs and other clients do.
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    tools: Union[list[AnthropicTool], None] = None
    tool_choice: Union[ToolChoice, None] = None
    metadata: Union[Metadata, None] = None
    service_tier: Union[Literal["auto", "standard_only"], None] = None  # accepted: one tier here
    thinking: Union[dict[str, Any], None] = None  # refused: no model served here thinks on demand
    output_config: Union[OutputConfig, None] = None
    cache_control: Union[dict[str, Any], None] = None  # a prompt-caching hint: accepted, the prefix cache is automatic


# --- answers ---------------------------------------------------------------------------------


class TextOut(Struct, tag="text", tag_field="type"):
    text: str


class ToolUseOut(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any


class MessagesUsage(Struct):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0  # prompt tokens that came from the prefix cache


class Message(Struct):
    id: str
    model: str
    content: list[Union[TextOut, ToolUseOut]]
    stop_reason: Union[Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"], None]
    stop_sequence: Union[str, None]
    usage: MessagesUsage
    type: str = "message"
    role: str = "assistant"


class AnthropicErrorDetail(Struct):
    type: str
    message: str


class AnthropicError(Struct):
    error: AnthropicErrorDetail
    type: str = "error"
