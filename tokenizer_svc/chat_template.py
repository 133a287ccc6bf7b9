"""A model's chat template, rendered the way `transformers`' `apply_chat_template` renders it.

Chat templates are Jinja programs shipped with the model, so they are untrusted code: they run in
Jinja's immutable sandbox with the same environment transformers gives them (`trim_blocks`,
`lstrip_blocks`, loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`,
`strftime_now`, a restricted `dict` and `namespace`, and `{% generation %}` blocks), and see the
same variables: `messages`, `add_generation_prompt`, `tools`, `documents` and the named special
tokens (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.errors import CheckpointError, InvalidArgument

# The roles of the OpenAI chat format, which every chat template we know of is written for.
DEFAULT_ROLES = frozenset({"system", "user", "assistant", "tool"})


class ChatTemplate:
    """One compiled chat template: `render(messages, add_generation_prompt)` → the prompt text."""

    def __init__(self, source: str, special_tokens: Mapping[str, str],
                 roles: Iterable[str] = DEFAULT_ROLES) -> None:
        self.source = source
        self.roles = frozenset(roles)
        self._special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(
                f"the chat template does not compile: {e} (line {e.lineno})") from e

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The prompt for `messages` ({"role", "content"} mappings, oldest first).

        Raises `InvalidArgument` for an empty conversation, a role outside `roles`, or a template
        that refuses the conversation (its `raise_exception`) or fails on it.
        """
        if not messages:
            raise InvalidArgument("the chat has no messages")
        for index, message in enumerate(messages):
            if message["role"] not in self.roles:
                raise InvalidArgument(
                    f"message {index}: unknown role {message['role']!r}; the roles this service "
                    f"accepts are {', '.join(sorted(self.roles))}")
        plain = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        try:
            return self._template.render(
                messages=plain, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self._special_tokens)
        except Exception as e:  # the template is the model's code: any failure is the input's fault
            raise InvalidArgument(
                f"the chat template failed to render: {type(e).__name__}: {e}") from e

    def literal_text(self) -> str:
        """The template's literal text and string constants, NUL-separated: what it can write."""
        ast = _environment().parse(self.source)
        parts = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
        parts |= {node.value for node in ast.find_all(jinja2.nodes.Const)
                  if isinstance(node.value, str)}
        return "\0".join(sorted(parts))


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    prompts only needs its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names so a template cannot reach interpreter
    internals through it (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Dict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env
