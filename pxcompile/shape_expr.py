"""Symbolic-shape expressions from a model file, read by a grammar of our own.

torch.export writes the sizes of dynamic dimensions as sympy expressions in text
(``Mul(Integer(32), Symbol('s77', positive=True, integer=True))``), and torch's deserializer
hands that text to ``sympy.sympify``, which evaluates it: arbitrary code, or
``Float('1.5', 100000000)`` computing 10**8 digits. :func:`parse_shape_expr` accepts only
integers below 2**63, export's shape symbols, ``+ - * // %``, max/min, comparisons and small
powers, and returns the expression written out by us, which is all sympy ever sees.
Torch-free.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SYMBOL", "ShapeExprError", "parse_shape_expr"]


class ShapeExprError(Exception):
    """A shape expression outside the grammar (the message says what)."""


_MAX_INT = 1 << 63

SYMBOL = re.compile(r"(s|u|d|zf|zuf|ps|c|q|f|i)[0-9]{1,9}\Z")
_EXPR_TOKEN = re.compile(r"\s*(?:([0-9]+)|([A-Za-z_][A-Za-z0-9_]*)|'([^']*)'|(//|[-+*%(),=]))")
_EXPR_MAX_CHARS = 2048
_EXPR_MAX_DEPTH = 32
# function name in the file -> (sympy / torch function it stands for, least / most arguments)
_EXPR_CALLS = {
    "Add": ("Add", 1, 64),
    "Mul": ("Mul", 1, 64),
    "Max": ("Max", 1, 64),
    "Min": ("Min", 1, 64),
    "max": ("Max", 1, 64),
    "min": ("Min", 1, 64),
    "FloorDiv": ("FloorDiv", 2, 2),
    "Mod": ("Mod", 2, 2),
    "PythonMod": ("PythonMod", 2, 2),
    "Eq": ("Eq", 2, 2),
    "Ne": ("Ne", 2, 2),
    "Lt": ("Lt", 2, 2),
    "Le": ("Le", 2, 2),
    "Gt": ("Gt", 2, 2),
    "Ge": ("Ge", 2, 2),
    "StrictLessThan": ("Lt", 2, 2),
    "LessThan": ("Le", 2, 2),
    "StrictGreaterThan": ("Gt", 2, 2),
    "GreaterThan": ("Ge", 2, 2),
}
_SYMBOL_FLAGS = {"positive", "nonnegative", "integer"}


class _Expr:
    """expr := term (('+' | '-') term)* ; term := unary (('*' | '//' | '%') unary)* ;
    unary := '-' unary | atom ; atom := INT | SYMBOL | '(' expr ')' | Integer(['-'] INT) |
    Symbol('SYMBOL' [, FLAG=True|False]*) | Pow(expr, Integer(0..8)) | F(expr, ...) for F in
    _EXPR_CALLS.

    Integers are below 2**63, symbols are export's shape symbols (``s0``, ``u3``...), powers
    have a small literal exponent and no power in their base (dynamic sequences give
    ``seq**2``): so evaluating an expression costs at most a few thousand digits. The result is
    the same expression written out by us in sympy's function form."""

    def __init__(self, s: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(s):
            m = _EXPR_TOKEN.match(s, pos)
            if m is None:
                if s[pos:].strip() == "":
                    break
                raise ShapeExprError(f"a shape expression it cannot read: {s[:60]!r}")
            kind = ("int", "name", "str", "op")[m.lastindex - 1]
            self.tokens.append((kind, m.group(m.lastindex)))
            pos = m.end()
        self.i = 0
        self.text = s
        self.in_pow = False

    def fail(self) -> ShapeExprError:
        return ShapeExprError(f"a shape expression it cannot read: {self.text[:60]!r}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        k, v = self.peek()
        if k != kind or (value is not None and v != value):
            raise self.fail()
        self.i += 1
        return v

    def parse(self) -> str:
        out = self.expr(0)
        if self.peek()[0] != "end":
            raise self.fail()
        return out

    def expr(self, depth: int) -> str:
        if depth > _EXPR_MAX_DEPTH:
            raise ShapeExprError("a shape expression nested too deep")
        out = self.term(depth)
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take("op")
            right = self.term(depth)
            out = f"Add({out}, {right})" if op == "+" else f"Add({out}, Mul(Integer(-1), {right}))"
        return out

    def term(self, depth: int) -> str:
        out = self.unary(depth)
        while self.peek() in (("op", "*"), ("op", "//"), ("op", "%")):
            op = self.take("op")
            right = self.unary(depth)
            fn = {"*": "Mul", "//": "FloorDiv", "%": "Mod"}[op]
            out = f"{fn}({out}, {right})"
        return out

    def unary(self, depth: int) -> str:
        if self.peek() == ("op", "-"):
            self.take("op")
            if depth > _EXPR_MAX_DEPTH:
                raise ShapeExprError("a shape expression nested too deep")
            return f"Mul(Integer(-1), {self.unary(depth + 1)})"
        return self.atom(depth)

    def integer(self, negative: bool = False) -> str:
        text = self.take("int")
        if len(text) > 19 or int(text) >= _MAX_INT:
            raise ShapeExprError(f"an integer out of range in a shape expression: {text[:40]}")
        return f"Integer({'-' if negative else ''}{int(text)})"

    def atom(self, depth: int) -> str:
        kind, value = self.peek()
        if kind == "int":
            return self.integer()
        if (kind, value) == ("op", "("):
            self.take("op")
            out = self.expr(depth + 1)
            self.take("op", ")")
            return out
        if kind != "name":
            raise self.fail()
        self.take("name")
        if self.peek() != ("op", "("):
            if SYMBOL.match(value):
                return value
            raise ShapeExprError(f"the name {value[:40]!r} in a shape expression")
        self.take("op", "(")
        if value == "Integer":
            negative = self.peek() == ("op", "-")
            if negative:
                self.take("op")
            out = self.integer(negative)
            self.take("op", ")")
            return out
        if value == "Symbol":
            return self.symbol()
        if value == "Pow":
            return self.power(depth)
        if value not in _EXPR_CALLS:
            raise ShapeExprError(f"the function {value[:40]!r} in a shape expression")
        fn, least, most = _EXPR_CALLS[value]
        args = [self.expr(depth + 1)]
        while self.peek() == ("op", ","):
            self.take("op")
            args.append(self.expr(depth + 1))
        self.take("op", ")")
        if not least <= len(args) <= most:
            raise self.fail()
        return f"{fn}({', '.join(args)})"

    def power(self, depth: int) -> str:
        if self.in_pow:
            raise ShapeExprError("a power of a power in a shape expression")
        self.in_pow = True
        base = self.expr(depth + 1)
        self.in_pow = False
        self.take("op", ",")
        self.take("name", "Integer")
        self.take("op", "(")
        exponent = self.take("int")
        self.take("op", ")")
        self.take("op", ")")
        if len(exponent) > 1 or int(exponent) > 8:
            raise ShapeExprError(f"the power {exponent[:20]} in a shape expression (at most 8)")
        return f"Pow({base}, Integer({int(exponent)}))"

    def symbol(self) -> str:
        name = self.take("str")
        if not SYMBOL.match(name):
            raise ShapeExprError(f"the shape symbol {name[:40]!r}")
        flags = {}
        while self.peek() == ("op", ","):
            self.take("op")
            key = self.take("name")
            self.take("op", "=")
            value = self.take("name")
            if key not in _SYMBOL_FLAGS or value not in ("True", "False") or key in flags:
                raise self.fail()
            flags[key] = value
        self.take("op", ")")
        return f"Symbol({name!r}{''.join(f', {k}={v}' for k, v in sorted(flags.items()))})"


def parse_shape_expr(s: Any) -> str:
    """The shape expression ``s`` re-written by us, or :class:`ShapeExprError` if it is outside
    the grammar (see :class:`_Expr`). Only the result ever reaches sympy."""
    if not isinstance(s, str) or len(s) > _EXPR_MAX_CHARS:
        raise ShapeExprError("a shape expression that is not a short string")
    return _Expr(s).parse()
