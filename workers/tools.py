"""Tool calling: the functions in the prompt, the calls out of the answer, and a grammar when a call is forced.

In the prompt. A model whose chat template knows tools (mlx-lm reads its tool-call markers and parser from the
template: `TokenizerWrapper.has_tool_calling`) is shown them by its template, with the history's calls and results.
One whose template does not (the bundled SmolLM2's silently drops `tools`, and fails on an assistant message
without content) is shown them in the format Ollama ships for SmolLM2, which its instruct data used: the
functions as JSON inside `<tools>` in the system turn, calls as `<tool_call>[{"name": ..., "arguments": ...}]
</tool_call>`, results as a user turn in `<tool_response>`.

Out of the answer. `CallSplitter` lets text through until the format's start marker, holds what follows until its
end marker, and parses it with the format's parser (mlx-lm's). A call goes out whole once it parses and names one
of the tools: a streamed call is never half of one that then turns out malformed. Held text that never closes or
does not parse goes out as text at the end; it is not dropped (mlx-lm's server drops it).

Forced. With `tool_choice` "required" or a named function the answer is constrained (workers/constrain.py) by an
llguidance grammar to `<tool_call>[call, ...]</tool_call>`, each call `{"name": <one of them>, "arguments": <its
parameters' schema>}`: a valid call even from a 135M model. That format is parsed with mlx-lm's `json_tools`
parser, whatever the model's own, since the grammar fixed it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable

from mlx_lm.tool_parsers import json_tools

from schemas.jobs import Job
from schemas.openai import ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
MAX_TOOLS_BYTES = 100_000  # the functions' JSON, all together: as a response_format schema (workers/constrain.py)

# Ollama's SmolLM2 system prompt for tools (ollama.com/library/smollm2), the functions where it says.
TOOLS_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. Based on "
    "the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the "
    "functions can be used, point it out and refuse to answer. If the given question lacks the parameters required "
    "by the function, also point it out.\n\nYou have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\nThe example "
    "format is as follows. Please make sure the parameter type is correct. If no function call is needed, please "
    "make the tool calls an empty list '[]'.\n<tool_call>[\n{{\"name\": \"func_name1\", \"arguments\": "
    "{{\"argument1\": \"value1\", \"argument2\": \"value2\"}}}},\n... (more tool calls as required)\n]</tool_call>")


class ToolsError(ValueError):
    """A request whose tools cannot be honoured; `param` names the field (OpenAI's 400)."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class CallFormat:
    """How a model writes calls: between `start` and `end` (end "" : to the end of the answer), read by `parse`."""

    start: str
    end: str
    parse: Callable[[str, list | None], object]  # mlx-lm's parser: a call, or a list of them, as dicts


FORCED = CallFormat(json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)


def offered(job: Job) -> list[Tool]:
    """The tools the model is shown: none with tool_choice "none"."""
    return list(job.tools or []) if job.tool_choice != "none" else []


def forced(job: Job) -> list[Tool] | None:
    """The tools an answer must call, when tool_choice forces a call; None when it does not."""
    if not job.tools or job.tool_choice in ("none", "auto"):
        return None
    if isinstance(job.tool_choice, NamedToolChoice):
        return [t for t in job.tools if t.function.name == job.tool_choice.function.name]
    return list(job.tools)


def native(tokenizer) -> bool:
    """Whether the model's own chat template renders tools (mlx-lm found its call markers in it)."""
    return bool(getattr(tokenizer, "has_tool_calling", False))


def call_format(job: Job, tokenizer) -> CallFormat | None:
    """How this job's answer writes calls; None when it may make none."""
    if not offered(job):
        return None
    if forced(job) is None and native(tokenizer):
        return CallFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)
    return FORCED


def check_tools(job: Job) -> None:
    """What OpenAI refuses about `tools` and `tool_choice`, for every submitter (the ingress and NATS jobs)."""
    if job.kind != "chat" and (job.tools or job.tool_choice != "auto"):
        raise ToolsError("'tools' and 'tool_choice' are for chat jobs.", "tools", "unsupported_parameter")
    if job.tools is not None and not job.tools:
        raise ToolsError("Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty "
                         "array instead.", "tools", "empty_array")
    if job.tool_choice != "auto" and not job.tools and job.tool_choice != "none":
        raise ToolsError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                         "tool_choice")
    if len(json.dumps([schema_of(t) for t in job.tools or []])) > MAX_TOOLS_BYTES:
        raise ToolsError(f"Invalid 'tools': more than {MAX_TOOLS_BYTES} bytes of JSON (a grammar that large takes "
                         f"seconds to compile).", "tools", "invalid_value")
    names = [t.function.name for t in job.tools or []]
    if len(set(names)) < len(names):
        raise ToolsError("Invalid 'tools': function names must be unique.", "tools")
    if isinstance(job.tool_choice, NamedToolChoice) and job.tool_choice.function.name not in names:
        raise ToolsError(f"Invalid value for 'tool_choice': function '{job.tool_choice.function.name}' is not one of "
                         f"'tools'.", "tool_choice")
    if job.tools and job.params.json_schema is not None and job.tool_choice != "none":
        raise ToolsError("'response_format' cannot be combined with 'tools' unless 'tool_choice' is \"none\": an "
                         "answer cannot be both a call and JSON of the schema.", "response_format",
                         "unsupported_value")


def arguments_of(call: ToolCall) -> object:
    """A past call's arguments as the templates want them (a dict), or the text when it is not JSON."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def text_of(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def template_inputs(job: Job, tokenizer) -> tuple[list[dict], dict]:
    """The messages (and extra arguments) for the model's chat template, tools and their history included."""
    tools = offered(job)
    if native(tokenizer):
        messages = []
        for m in job.messages or []:
            message = {"role": "system" if m.role == "developer" else m.role, "content": text_of(m)}
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": arguments_of(c)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        return messages, ({"tools": [schema_of(t) for t in tools]} if tools else {})
    # The SmolLM2 format (module docstring), in a template that knows only roles and text.
    messages = []
    for m in job.messages or []:
        role, content = ("system" if m.role == "developer" else m.role), text_of(m)
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": arguments_of(c)} for c in m.tool_calls]
            content += f"{FORCED.start}{json.dumps(calls)}{FORCED.end}"
        if role == "tool":
            role, content = "user", f"<tool_response>{content}</tool_response>"
        messages.append({"role": role, "content": content})
    if tools:
        listed = TOOLS_PROMPT.format(tools=json.dumps([schema_of(t)["function"] for t in tools]))
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{listed}"}
        else:
            messages.insert(0, {"role": "system", "content": listed})
    return messages, {}


def schema_of(tool: Tool) -> dict:
    function = {"name": tool.function.name, "parameters": tool.function.parameters or NO_ARGUMENTS}
    if tool.function.description:
        function["description"] = tool.function.description
    return {"type": "function", "function": function}


def call_schema(tool: Tool) -> dict:
    """The JSON Schema of one call to `tool` in the forced format."""
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": tool.function.parameters or NO_ARGUMENTS},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_grammar(tools: list[Tool], parallel: bool, options: dict) -> str:
    """The llguidance Lark grammar of an answer that is calls to `tools` (one, unless `parallel`)."""
    calls = {"anyOf": [call_schema(t) for t in tools], "x-guidance": options}
    more = ' ("," call)*' if parallel else ""
    opening, closing = json.dumps(FORCED.start + "["), json.dumps("]" + FORCED.end)
    return f"%llguidance {{}}\nstart: {opening} call{more} {closing}\ncall: %json {json.dumps(calls)}\n"


class CallSplitter:
    """An answer's text split into what goes out as text and the calls it makes (module docstring)."""

    def __init__(self, format: CallFormat, tools: list[Tool]):
        self.format = format
        self.tools = tools
        self.names = {t.function.name for t in tools}
        self.held = ""  # text that may be (the start of) a call
        self.in_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Text to send now, and the calls completed by `text`."""
        self.held += text
        out, calls = "", []
        start, end = self.format.start, self.format.end
        while True:
            if not self.in_call:
                at = self.held.find(start)
                if at < 0:
                    keep = next((k for k in range(min(len(start) - 1, len(self.held)), 0, -1)
                                 if start.startswith(self.held[-k:])), 0)  # a marker may be arriving
                    out += self.held[:len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep:]
                    return out, calls
                out += self.held[:at]
                self.held = self.held[at + len(start):]
                self.in_call = True
            else:
                at = self.held.find(end) if end else -1
                if at < 0:
                    return out, calls
                body, self.held = self.held[:at], self.held[at + len(end):]
                self.in_call = False
                parsed = self.parse(body)
                if parsed is None:
                    out += start + body + end
                else:
                    calls += parsed

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: a call left open is parsed as it stands (a format without an end marker
        runs to the end), else its text goes out as text."""
        held, self.held = self.held, ""
        if not self.in_call:
            return held, []
        self.in_call = False
        parsed = self.parse(held)
        return ("", parsed) if parsed is not None else (self.format.start + held, [])

    def parse(self, body: str) -> list[ToolCall] | None:
        """The calls in one marked span ([] for none), or None when it is not calls to these tools."""
        try:
            found = self.format.parse(body, [schema_of(t) for t in self.tools])
        except Exception:  # each family's parser raises its own errors on text that is not a call
            return None
        found = found if isinstance(found, list) else [found]
        calls = []
        for call in found:
            if not isinstance(call, dict) or call.get("name") not in self.names:
                return None
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                                  function=FunctionCall(name=call["name"], arguments=arguments)))
        return calls  # [] for "[]": the format's way of calling nothing
