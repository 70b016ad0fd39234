"""OpenAI's Responses API request (`POST /v1/responses`), as msgspec Structs: what the `openai` SDK's
`responses.create` sends. The ingress translates it onto the same chat jobs as chat completions
(ingress/responses.py); its answers are written there."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct

from schemas.openai import ChatMessage, JsonSchemaFormat


class FunctionTool(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    parameters: Union[dict[str, Any], None] = None
    description: Union[str, None] = None
    strict: Union[bool, None] = None  # a forced call always matches its schema


class FunctionChoice(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str


class TextFormat(Struct, forbid_unknown_fields=True):
    """`text.format`: chat's `response_format` flattened (its json_schema's fields beside `type`)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Union[str, None] = None
    schema: Union[dict[str, Any], None] = None
    strict: Union[bool, None] = None
    description: Union[str, None] = None

    def json_schema(self) -> JsonSchemaFormat | None:
        return JsonSchemaFormat(name=self.name or "", schema=self.schema, strict=self.strict,
                                description=self.description) if self.type == "json_schema" else None


class TextConfig(Struct, forbid_unknown_fields=True):
    format: Union[TextFormat, None] = None
    verbosity: Union[Literal["medium"], None] = None  # the only one a model without the setting has


# Input items. They ignore fields they do not know: a client sends an answer's output items back as it got them,
# with their `id` and `status`.
class MessageItem(Struct):
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[dict[str, Any]]]
    type: Literal["message"] = "message"


class FunctionCallItem(Struct):
    call_id: str
    name: str
    arguments: str
    type: Literal["function_call"] = "function_call"


class FunctionCallOutputItem(Struct):
    call_id: str
    output: Union[str, list[dict[str, Any]]]
    type: Literal["function_call_output"] = "function_call_output"


class ResponsesRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: Union[str, list[dict[str, Any]]]  # each item decoded by its `type` (ingress/responses.py: items)
    instructions: Union[str, None] = None
    max_output_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    stream: bool = False
    tools: Union[list[FunctionTool], None] = None
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: Union[bool, None] = None
    text: Union[TextConfig, None] = None
    previous_response_id: Union[str, None] = None  # a response of the last CONCLAVE_RESULTS_TTL_HOURS to continue
    # Refused with a 400 naming them: no model served here reasons on demand.
    reasoning: Union[dict[str, Any], None] = None
    include: Union[list[str], None] = None
    store: Union[bool, None] = None  # False: nothing is kept to continue this response from
    # Accepted without effect on the answer, as OpenAI accepts them.
    metadata: Union[dict[str, str], None] = None
    user: Union[str, None] = None
    safety_identifier: Union[str, None] = None
    prompt_cache_key: Union[str, None] = None
    service_tier: Union[Literal["auto", "default", "flex", "scale", "priority"], None] = None
    truncation: Union[Literal["disabled"], None] = None  # "auto" (dropping the conversation's start) is not done
    stream_options: Union[dict[str, Any], None] = None


class Conversation(Struct):
    """What a response was asked, kept by its id (CONCLAVE_CONVERSATIONS) for one that continues it
    (`previous_response_id`): the model and the messages, without the instructions (OpenAI does not carry them
    over). Its answer is its job's result (CONCLAVE_RESULTS)."""

    model: str
    messages: list[ChatMessage]
    caller: str = ""  # who asked (the API key's name): only they may continue it
