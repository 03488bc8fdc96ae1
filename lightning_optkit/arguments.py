"""Check optimizer and scheduler arguments against the types their signature declares.

A keyword's annotation (``betas: tuple[float, float]``, ``foreach: bool | None``, ``step_size: int``,
``mode: Literal['min', 'max']``), or where it has none the type of its default, says what the callee
accepts. A value of another type or arity would otherwise fail inside torch, often only at the first
optimizer step, and name no argument. Numbers written as text (YAML 1.1 reads ``1e-3`` as a string)
are read as numbers where a number is expected. Types this module does not know (a class, ``Any``)
accept anything: the dry run (see :mod:`lightning_optkit.probe`) checks those values.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch

from lightning_optkit.errors import SpecError, closest
from lightning_optkit.validation import number


@dataclass(frozen=True)
class ArgType:
    """One node of a parsed annotation.

    ``kind``: any, none, bool, int, float, str, tensor, callable, literal (``values``), tuple
    (``items``, or one item and ``variadic``), list (one item) or union (``items``).
    """

    kind: str
    items: tuple[ArgType, ...] = ()
    values: tuple[Any, ...] = ()
    variadic: bool = False


ANY = ArgType("any")
_NONE = ArgType("none")
_ATOMS = {"None": "none", "NoneType": "none", "bool": "bool", "int": "int", "float": "float", "str": "str",
          "Tensor": "tensor"}
_SEQUENCES = ("list", "List", "Sequence", "MutableSequence", "Iterable", "Collection")
_TOKEN = re.compile(r"\s*(?:(\.\.\.)|('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(-?\d+(?:\.\d*)?)|([A-Za-z_][\w.]*)"
                    r"|([\[\],|]))")


class _Unparsed(Exception):
    """The annotation uses a form the small parser below does not read (then any value passes)."""


class _Parser:
    """Recursive descent over the text of an annotation: ``float | list[float]``, ``Optional[int]``, ..."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise _Unparsed(text)
            kinds = ("ellipsis", "string", "number", "name", "punct")
            kind = next(k for k, g in zip(kinds, match.groups()) if g is not None)
            self.tokens.append((kind, match.group(kinds.index(kind) + 1)))
            pos = match.end()
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise _Unparsed("unexpected end")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def union(self) -> ArgType:
        alternatives = [self.term()]
        while self.peek() == "|":
            self.take()
            alternatives.append(self.term())
        return alternatives[0] if len(alternatives) == 1 else ArgType("union", tuple(alternatives))

    def skip_brackets(self) -> None:
        depth = 0
        while True:
            _, tok = self.take()
            depth += tok == "["
            depth -= tok == "]"
            if depth == 0:
                return

    def arguments(self, literal: bool) -> list[Any]:
        self.take()  # "["
        out: list[Any] = []
        while True:
            if literal:
                kind, tok = self.take()
                out.append(_literal_value(kind, tok))
            elif self.peek() == "...":
                self.take()
                out.append(...)
            else:
                out.append(self.union())
            _, tok = self.take()
            if tok == "]":
                return out
            if tok != ",":
                raise _Unparsed(tok)

    def term(self) -> ArgType:
        kind, tok = self.take()
        if kind != "name":
            raise _Unparsed(tok)
        base = tok.rsplit(".", 1)[-1]
        if base == "Callable":
            if self.peek() == "[":
                self.skip_brackets()
            return ArgType("callable")
        args = self.arguments(literal=base == "Literal") if self.peek() == "[" else None
        return _node(base, args)


def _literal_value(kind: str, tok: str) -> Any:
    if kind == "string":
        return tok[1:-1]
    if kind == "number":
        return float(tok) if "." in tok else int(tok)
    if kind == "name" and tok in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[tok]
    raise _Unparsed(tok)


def _node(base: str, args: list[Any] | None) -> ArgType:
    if base in _ATOMS and args is None:
        return ArgType(_ATOMS[base])
    if base == "Optional" and args and len(args) == 1:
        return ArgType("union", (args[0], _NONE))
    if base == "Union" and args:
        return ArgType("union", tuple(args))
    if base == "Literal" and args:
        return ArgType("literal", values=tuple(args))
    if base in ("tuple", "Tuple"):
        if not args:
            return ArgType("tuple", (ANY,), variadic=True)
        if len(args) == 2 and args[1] is ...:
            return ArgType("tuple", (args[0],), variadic=True)
        if ... in args:
            raise _Unparsed(base)
        return ArgType("tuple", tuple(args))
    if base in _SEQUENCES:
        return ArgType("list", (args[0] if args else ANY,))
    return ANY


def _from_default(default: Any) -> ArgType:
    if isinstance(default, bool):
        return ArgType("bool")
    if isinstance(default, (int, float)):
        return ArgType("float")
    if isinstance(default, str):
        return ArgType("str")
    if isinstance(default, tuple) and default:
        return ArgType("tuple", tuple(ANY if d is None else _from_default(d) for d in default))
    return ANY


def argument_type(param: inspect.Parameter) -> ArgType:
    """What ``param`` accepts: its annotation parsed, else the type of its default; ANY when unknown."""
    annotation = param.annotation
    node = ANY
    if annotation is not param.empty:
        text = annotation if isinstance(annotation, str) else (
            annotation.__name__ if isinstance(annotation, type) else str(annotation))
        try:
            parser = _Parser(text)
            node = parser.union()
            if parser.peek() is not None:
                node = ANY
        except _Unparsed:
            node = ANY
    elif param.default is not param.empty:
        node = _from_default(param.default)
    if param.default is None and node.kind != "any" and not _accepts_none(node):
        node = ArgType("union", (node, _NONE))
    return node


def _accepts_none(node: ArgType) -> bool:
    return node.kind == "none" or (node.kind == "union" and any(_accepts_none(a) for a in node.items))


def describe(node: ArgType) -> str:
    """'a number', 'a list of 2 numbers', 'true or false', 'one of 'min', 'max'' ..."""
    kind = node.kind
    simple = {"any": "a value", "none": "None", "bool": "true or false", "int": "an integer", "float": "a number",
              "str": "a string", "tensor": "a tensor", "callable": "a callable"}
    if kind in simple:
        return simple[kind]
    if kind == "literal":
        return "one of " + ", ".join(repr(v) for v in node.values)
    if kind == "list" or (kind == "tuple" and node.variadic):
        return f"a list (each item {describe(node.items[0])})"
    if kind == "tuple":
        parts = [describe(i) for i in node.items]
        nouns = {"a number": "numbers", "an integer": "integers", "true or false": "bools"}
        if len(set(parts)) == 1:
            noun = nouns.get(parts[0])
            return f"a list of {len(parts)} {noun}" if noun else f"a list of {len(parts)} items, each {parts[0]}"
        return f"a list of {len(parts)} items ({'; '.join(parts)})"
    return " or ".join(dict.fromkeys(describe(a) for a in node.items))


def _fits(node: ArgType, value: Any) -> bool:
    """Whether ``value`` has the type ``node`` describes (its content is checked by :func:`_check`)."""
    kind = node.kind
    if kind in ("int", "float"):
        return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind in ("tuple", "list"):
        return isinstance(value, (list, tuple))
    if kind == "literal":
        return any(type(value) is type(v) for v in node.values)
    if kind == "union":
        return any(_fits(a, value) for a in node.items)
    return {
        "any": True, "none": value is None, "bool": isinstance(value, bool), "str": isinstance(value, str),
        "tensor": isinstance(value, torch.Tensor), "callable": callable(value),
    }[kind]


def _mismatch(field: str, value: Any, node: ArgType) -> SpecError:
    return SpecError(field, value, f"give {describe(node)}", problem=f"is not {describe(node)}")


def _check(node: ArgType, field: str, value: Any) -> Any:
    kind = node.kind
    if kind == "union":
        fitting = [a for a in node.items if _fits(a, value)]
        if isinstance(value, str):  # text is a string first, a number only where no string is wanted
            fitting.sort(key=lambda a: a.kind not in ("str", "literal"))
        first: SpecError | None = None
        for alternative in fitting:
            try:
                return _check(alternative, field, value)
            except SpecError as err:
                first = first or err
        raise first or _mismatch(field, value, node)
    if not _fits(node, value):
        raise _mismatch(field, value, node)
    if kind == "int":
        return number(field, value, integer=True, fix=f"give {describe(node)}")
    if kind == "float":
        return number(field, value, fix=f"give {describe(node)}")
    if kind == "literal":
        if value in node.values:
            return value
        near = closest(value, [v for v in node.values if isinstance(v, str)]) if isinstance(value, str) else []
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise SpecError(field, value, f"{hint}choose {describe(node)}", problem="is not an option")
    if kind == "tuple" and not node.variadic:
        if len(value) != len(node.items):
            raise SpecError(field, value, f"give {describe(node)}",
                            problem=f"has {len(value)} value{'s' * (len(value) != 1)}, not {len(node.items)}")
        return tuple(_check(item, f"{field}[{i}]", v) for i, (item, v) in enumerate(zip(node.items, value)))
    if kind in ("tuple", "list"):
        items = [_check(node.items[0], f"{field}[{i}]", v) for i, v in enumerate(value)]
        return tuple(items) if kind == "tuple" else items
    return value


def check_argument(field: str, value: Any, param: inspect.Parameter) -> Any:
    """``value`` checked against what ``param`` declares, numbers in text read as numbers, lists made tuples
    where a tuple is declared; a SpecError naming ``field`` (and the item, ``betas[1]``) otherwise."""
    return _check(argument_type(param), field, value)
