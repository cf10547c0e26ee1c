"""The subset of Go's text/template (with a few Helm functions) that the tunemesh chart uses.

Supported: text with `{{ }}` actions and `{{-` / `-}}` whitespace trimming, comments,
`if` / `else if` / `else`, `range` (over lists, maps in key order, with `$i, $e :=` or
`$e :=`), `with`, pipelines (`a | f b`), parenthesised pipelines, fields (`.Values.x`,
`$.Release.Name`, `$var.field`), string / number / bool literals, and the functions in
`FUNCTIONS`. Anything else is a `TemplateError`, so a chart that renders here uses only
syntax Helm understands too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml


class TemplateError(Exception):
    """A template that does not parse, or fails while it executes."""


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(n: int, text: str) -> str:
    pad = " " * n
    return "\n".join(pad + line for line in str(text).split("\n"))


def _fail(message: str) -> None:
    raise TemplateError(message)


def _printf(fmt: str, *args: Any) -> str:
    """Go's Sprintf for the verbs %s, %v, %d and %%."""
    values = iter(args)
    return re.sub(r"%[svd%]", lambda m: "%" if m.group() == "%%" else _text(next(values)), fmt)


def _default(fallback: Any, value: Any = None) -> Any:
    return value if truthy(value) else fallback


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "printf": _printf,
    "quote": lambda v: json.dumps(_text(v)),
    "toYaml": _to_yaml,
    "toJson": lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")),
    "indent": _indent,
    "nindent": lambda n, text: "\n" + _indent(n, text),
    "default": _default,
    "b64enc": lambda s: base64.b64encode(_text(s).encode()).decode(),
    "sha256sum": lambda s: hashlib.sha256(_text(s).encode()).hexdigest(),
    "lower": lambda s: _text(s).lower(),
    "replace": lambda old, new, s: _text(s).replace(old, new),
    "trimSuffix": lambda suffix, s: _text(s).removesuffix(suffix),
    "base": lambda s: posixpath.basename(_text(s)),
    "int": int,
    "mul": lambda *xs: _product(xs),
    "until": lambda n: list(range(int(n))),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "lt": lambda a, b: a < b,
    "not": lambda v: not truthy(v),
    "and": lambda *vs: next((v for v in vs if not truthy(v)), vs[-1]),
    "or": lambda *vs: next((v for v in vs if truthy(v)), vs[-1]),
    "fail": _fail,
}


def _product(xs: tuple) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def truthy(value: Any) -> bool:
    """Go template truth: false, 0, nil and empty strings, lists and maps are false."""
    return value is not None and value is not False and value != 0 and value != "" and value != [] and value != {}


def _text(value: Any) -> str:
    """How an action prints a value; maps, lists and missing values must go through a function."""
    if value is None:
        raise TemplateError("value is missing (a typo in the template or values?)")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise TemplateError(f"cannot print a {type(value).__name__}: use toYaml or toJson")
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


# ---- parsing -------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)'
    r"|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)|(?P<decl>:=)|(?P<punct>[|(),])|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass
class _Node:
    kind: str  # text, print, if, range, with
    text: str = ""
    pipe: list | None = None
    names: list[str] = field(default_factory=list)  # range/with variables, print assignments
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)
    chained: bool = False  # an `else if`: closed by its parent's `end`


def _lex(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise TemplateError(f"cannot parse {expr[pos:]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return tokens


def _parse_pipe(tokens: list[tuple[str, str]], pos: int = 0) -> tuple[list, int]:
    """A pipeline: a list of commands, each a list of operands; stops at ')' or the end."""
    commands, operands = [], []
    while pos < len(tokens):
        kind, value = tokens[pos]
        if value == ")":
            break
        if value == "|":
            commands.append(operands)
            operands = []
        elif value == "(":
            inner, pos = _parse_pipe(tokens, pos + 1)
            if pos >= len(tokens) or tokens[pos][1] != ")":
                raise TemplateError("unclosed '('")
            operands.append(("pipe", inner))
        else:
            operands.append((kind, value))
        pos += 1
    commands.append(operands)
    if any(not c for c in commands):
        raise TemplateError("empty command in pipeline")
    return commands, pos


def _declarations(tokens: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split `$a, $b := pipe` into the variable names and the pipeline's tokens."""
    if ("decl", ":=") not in tokens:
        return [], tokens
    at = tokens.index(("decl", ":="))
    names = [v for k, v in tokens[:at] if k == "var"]
    return names, tokens[at + 1:]


def _segments(source: str) -> list[tuple[str, str]]:
    """Text and action strings in order, with `{{-` / `-}}` trimming applied to the text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = source[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def parse(source: str) -> list[_Node]:
    """The template's tree of nodes."""
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for kind, value in _segments(source):
        body = stack[-1][1]
        if kind == "text":
            if value:
                body.append(_Node("text", text=value))
            continue
        if value.startswith("/*"):
            continue
        word, _, rest = value.partition(" ")
        if word in ("if", "range", "with"):
            names, tokens = _declarations(_lex(rest))
            node = _Node(word, pipe=_parse_pipe(tokens)[0], names=names)
            body.append(node)
            stack.append((node, node.body))
        elif word == "else":
            _parse_else(stack, rest)
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("'end' without a block")
            while True:  # an `else if` chain closes with the one `end`
                node, _ = stack.pop()
                if not node.chained:
                    break
        else:
            names, tokens = _declarations(_lex(value))
            body.append(_Node("print", pipe=_parse_pipe(tokens)[0], names=names))
    if len(stack) != 1:
        raise TemplateError(f"unclosed {stack[-1][0].kind!r} block")
    return root


def _parse_else(stack: list, rest: str) -> None:
    node, _ = stack[-1]
    if node is None or node.kind not in ("if", "range", "with"):
        raise TemplateError("'else' outside a block")
    stack[-1] = (node, node.orelse)
    if rest.startswith("if "):  # `else if X` is an `if` inside the else branch
        inner = _Node("if", pipe=_parse_pipe(_lex(rest[3:]))[0], chained=True)
        node.orelse.append(inner)
        stack.append((inner, inner.body))


# ---- execution -----------------------------------------------------------------------


@dataclass
class _Scope:
    dot: Any
    variables: dict[str, Any]


def _field(value: Any, names: list[str]) -> Any:
    for name in names:
        if value is None:
            raise TemplateError(f"nil value evaluating .{name}")
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def _operand(scope: _Scope, kind: str, value: Any) -> Any:
    if kind == "str":
        return json.loads(value)
    if kind == "num":
        return int(value)
    if kind == "pipe":
        return _run_pipe(scope, value)
    if kind == "field":
        return scope.dot if value == "." else _field(scope.dot, value[1:].split("."))
    if kind == "var":
        name, *path = value.split(".")
        if name not in scope.variables:
            raise TemplateError(f"undefined variable {name}")
        return _field(scope.variables[name], path)
    if kind == "ident" and value in ("true", "false"):
        return value == "true"
    raise TemplateError(f"unexpected {value!r}")


def _run_command(scope: _Scope, command: list, piped: list) -> Any:
    (kind, head), rest = command[0], command[1:]
    args = [_operand(scope, k, v) for k, v in rest] + piped
    if kind == "ident" and head not in ("true", "false"):
        if head not in FUNCTIONS:
            raise TemplateError(f"unknown function {head!r}")
        return FUNCTIONS[head](*args)
    value = _operand(scope, kind, head)
    if callable(value):
        return value(*args)
    if args:
        raise TemplateError(f"{head} is not a function")
    return value


def _run_pipe(scope: _Scope, pipe: list) -> Any:
    value = _run_command(scope, pipe[0], [])
    for command in pipe[1:]:
        value = _run_command(scope, command, [value])
    return value


def _items(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return [(k, value[k]) for k in sorted(value)]
    if isinstance(value, list):
        return list(enumerate(value))
    if value is None:
        return []
    raise TemplateError(f"cannot range over {type(value).__name__}")


def _execute(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            value = _run_pipe(scope, node.pipe)
            if node.names:
                scope.variables[node.names[0]] = value
            else:
                out.append(_text(value))
        elif node.kind == "range":
            _execute_range(node, scope, out)
        else:  # if / with
            value = _run_pipe(scope, node.pipe)
            if not truthy(value):
                _execute(node.orelse, scope, out)
            else:
                dot = value if node.kind == "with" else scope.dot
                _execute(node.body, _Scope(dot, dict(scope.variables)), out)


def _execute_range(node: _Node, scope: _Scope, out: list[str]) -> None:
    items = _items(_run_pipe(scope, node.pipe))
    if not items:
        _execute(node.orelse, scope, out)
    for key, element in items:
        variables = dict(scope.variables)
        if len(node.names) == 2:
            variables[node.names[0]], variables[node.names[1]] = key, element
        elif node.names:
            variables[node.names[0]] = element
        _execute(node.body, _Scope(element, variables), out)


def render(source: str, data: Any) -> str:
    """Execute template `source` with `data` as dot (and `$`)."""
    out: list[str] = []
    _execute(parse(source), _Scope(data, {"$": data}), out)
    return "".join(out)
