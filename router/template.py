"""A model's own chat template, rendered as the engines render it.

vLLM prepares an OpenAI request's messages (text parts joined or wrapped, tool call arguments parsed
into objects, tool definitions dumped in its field order) and hands them to transformers'
`apply_chat_template`, which renders the Jinja template in a sandbox with `raise_exception`,
`strftime_now`, its own `tojson`, the tokenizer's special tokens and the request's
`chat_template_kwargs`. `ChatTemplate.render` does the same, so that the gateway's prompt text (and
so its tokens and block hashes) equals the engine's.
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
TEXT_PART_TYPES = ("text", "input_text", "output_text", "refusal")
# Passed by us from the request's own fields; a chat_template_kwargs entry may not replace them.
RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
MAX_KWARGS_BYTES = 64 * 1024


class TemplateError(ValueError):
    """A request the template cannot render (the gateway and the worker answer 400)."""


# --- the sandbox, as transformers builds it


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not, and exposes these options.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in templates, without giving them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant masks in training) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the model's chat template does not compile: {exc}") from exc


@functools.lru_cache(maxsize=64)
def wants_content_parts(source: str) -> bool:
    """vLLM's content format: a template that loops over a message's content gets it as a list of
    `{"type": "text", "text": ...}` parts ("openai"), any other a string ("string")."""
    env = jinja2.Environment(extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return any(_reads_content(loop.iter) for loop in tree.find_all(jinja2.nodes.For))


def _reads_content(node: jinja2.nodes.Node) -> bool:
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return False


# --- request options


class ChatOptions:
    """The request fields that shape the prompt besides messages and tools (vLLM's names)."""

    __slots__ = ("add_generation_prompt", "continue_final_message", "documents", "kwargs")

    def __init__(
        self,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: dict[str, Any] | None = None,
        documents: list[Any] | None = None,
    ) -> None:
        self.add_generation_prompt = add_generation_prompt
        self.continue_final_message = continue_final_message
        self.kwargs = kwargs or {}
        self.documents = documents

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChatOptions:
        """Validated from a chat request body; TemplateError on a wrong type."""
        if not any(name in body for name in OPTION_FIELDS):  # most requests: the defaults, shared
            return DEFAULT_OPTIONS
        add = body.get("add_generation_prompt", True)
        cont = body.get("continue_final_message", False)
        kwargs = body.get("chat_template_kwargs") or {}
        documents = body.get("documents")
        if not isinstance(add, bool) or not isinstance(cont, bool):
            raise TemplateError("'add_generation_prompt' and 'continue_final_message' must be booleans")
        if add and cont:
            raise TemplateError("'add_generation_prompt' and 'continue_final_message' exclude each other")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TemplateError("'chat_template_kwargs' must be an object")
        if kwargs and len(json.dumps(kwargs)) > MAX_KWARGS_BYTES:
            raise TemplateError(f"'chat_template_kwargs' exceeds {MAX_KWARGS_BYTES} bytes")
        if documents is not None and not (
            isinstance(documents, list) and all(isinstance(d, dict) for d in documents)
        ):
            raise TemplateError("'documents' must be a list of objects")
        kwargs = {k: v for k, v in kwargs.items() if k not in RESERVED_NAMES}
        return cls(add, cont, kwargs, documents)


DEFAULT_OPTIONS = ChatOptions()
OPTION_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents")


# --- messages and tools as vLLM hands them to transformers


def message_texts(content: Any) -> list[str]:
    """An OpenAI message content as its text parts; other parts (images, audio) are refused."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise TemplateError("message content must be a string or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or part.get("type") not in TEXT_PART_TYPES:
            raise TemplateError("only text content parts are supported")
        text = part.get("refusal") if part.get("type") == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise TemplateError("a text content part needs a string 'text'")
        texts.append(text)
    return texts


def conversation(messages: Any, content_parts: bool) -> list[dict[str, Any]]:
    """The messages a template sees: vLLM's parsed conversation, then transformers' normalisation
    (keys whose value is None dropped, reasoning under `reasoning_content` and `thinking` too)."""
    if not isinstance(messages, list):
        raise TemplateError("'messages' must be a list")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TemplateError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise TemplateError("each message needs a string 'role'")
        texts = message_texts(message.get("content"))
        item: dict[str, Any] = {"role": role}
        if content_parts and role != "tool":
            item["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            item["content"] = "\n".join(texts)
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise TemplateError("'tool_calls' must be a list")
                if calls:
                    item["tool_calls"] = [_tool_call(c) for c in calls]
            reasoning = message.get("reasoning", message.get("reasoning_content"))
            if isinstance(reasoning, str):
                item = {"thinking": reasoning, **item, "reasoning": reasoning, "reasoning_content": reasoning}
        elif role == "tool" and message.get("tool_call_id") is not None:
            item["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        out.append(item)
    return out


def _tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TemplateError("each tool call needs a 'function' object")
    call = copy.deepcopy(call)
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            call["function"]["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            call["function"]["arguments"] = {}  # vLLM's choice for arguments that are not JSON
    elif not isinstance(arguments, dict | list):
        call["function"]["arguments"] = {}
    return call


def tool_definitions(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as vLLM dumps its parsed request: declared fields first, in its order, then the rest."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise TemplateError("'tools' must be a list")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise TemplateError("each tool needs a 'function' object")
        function = tool["function"]
        if not isinstance(function.get("name"), str):
            raise TemplateError("each tool function needs a string 'name'")
        declared = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        declared.update((k, v) for k, v in function.items() if k not in declared)
        item = {"type": tool.get("type", "function"), "function": declared}
        item.update((k, v) for k, v in tool.items() if k not in item)
        out.append(item)
    return out


# --- the template


class ChatTemplate:
    """One model's chat template with its special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens
        self._template = compile_template(source)
        self.content_parts = wants_content_parts(source)

    def render(self, messages: Any, tools: Any = None, options: ChatOptions = DEFAULT_OPTIONS) -> str:
        """The prompt text; TemplateError names what the template refused or failed on."""
        chat = conversation(messages, self.content_parts)
        if not chat:
            raise TemplateError("'messages' must not be empty")
        final_tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if options.continue_final_message:
            chat[-1] = dict(chat[-1])
            final = chat[-1]["content"]
            if isinstance(final, list):
                if not final:
                    raise TemplateError("continue_final_message: the final message has no text")
                final = final[-1]["text"]
                chat[-1]["content"][-1] = {"type": "text", "text": final + final_tag}
            else:
                chat[-1]["content"] = final + final_tag
        variables = {**self.special_tokens, **options.kwargs}
        try:
            text = self._template.render(
                messages=chat,
                tools=tool_definitions(tools),
                documents=options.documents,
                add_generation_prompt=options.add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise TemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc
        if options.continue_final_message:
            text = _cut_at_final_tag(text, final, final_tag)
        return text


def _cut_at_final_tag(text: str, final: str, tag: str) -> str:
    """transformers' continue_final_message: the prompt ends where the final message's text ends."""
    if final.strip() not in text or tag.strip() not in text:
        raise TemplateError("continue_final_message: the template dropped the final message")
    at = text.rindex(tag.strip())
    return text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()


def special_tokens_of(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token... from tokenizer_config.json (strings, or AddedToken objects)."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def select_template(config: dict[str, Any], template_file: str | None, with_tools: bool) -> str | None:
    """The template transformers would use: chat_template.jinja, else tokenizer_config's chat_template
    (a string, or named templates of which `tool_use` serves requests with tools)."""
    if template_file:
        return template_file
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        chosen = named.get("tool_use") if with_tools and "tool_use" in named else named.get("default")
        return chosen if isinstance(chosen, str) else None
    return source if isinstance(source, str) else None
