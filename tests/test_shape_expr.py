"""pxcompile.shape_expr: the grammar shape expressions from a model file must fit (issue #11,
finding 2: sympy evaluated them); what it accepts is re-written, the rest refused."""

from __future__ import annotations

import pytest

from pxcompile.shape_expr import ShapeExprError, parse_shape_expr


@pytest.mark.parametrize(
    "text,want",
    [
        (
            "Symbol('s77', positive=True, integer=True)",
            "Symbol('s77', integer=True, positive=True)",
        ),
        (
            "Mul(Integer(32), Symbol('s0', integer=True))",
            "Mul(Integer(32), Symbol('s0', integer=True))",
        ),
        ("Min(Integer(32), Mul(Integer(-2), s1))", "Min(Integer(32), Mul(Integer(-2), s1))"),
        ("2*s0 + 1", "Add(Mul(Integer(2), s0), Integer(1))"),
        ("s0 - s1", "Add(s0, Mul(Integer(-1), s1))"),
        ("-(s0 // 2) % 3", "Mod(Mul(Integer(-1), FloorDiv(s0, Integer(2))), Integer(3))"),
        ("max(s0, 4)", "Max(s0, Integer(4))"),
        ("Eq(PythonMod(s0, 2), 0)", "Eq(PythonMod(s0, Integer(2)), Integer(0))"),
        (
            "Pow(Symbol('s70', integer=True), Integer(2))",
            "Pow(Symbol('s70', integer=True), Integer(2))",
        ),
        (
            "Mul(Pow(s0, Integer(8)), Pow(s1, Integer(8)))",
            "Mul(Pow(s0, Integer(8)), Pow(s1, Integer(8)))",
        ),
    ],
)
def test_shape_expression_grammar_accepts(text, want):
    assert parse_shape_expr(text) == want
    assert parse_shape_expr(want) == want


@pytest.mark.parametrize(
    "text",
    [
        "Float('1.5', 100000000)",
        "Pow(Integer(10), Integer(100000000))",
        "Pow(Integer(10), Integer(9))",
        "Pow(Pow(Integer(4611686018427387903), Integer(8)), Integer(8))",
        "Pow(s0, s1)",
        "Pow(s0, Integer(-1))",
        "Pow(s0, 2)",
        "s0 ** 1000000",
        "Integer(9223372036854775808)",
        "1" * 30,
        "Rational(1, 3)",
        "__import__('os').system('true')",
        "Symbol.__class__",
        "Symbol('x; import os')",
        "Symbol('s0', commutative=False)",
        "Symbol('s0', positive=True, positive=True)",
        "lambda: 0",
        "s0 if s0 else s1",
        "oo",
        "Max()",
        "FloorDiv(s0)",
        "(" * 40 + "s0" + ")" * 40,
        "-" * 40 + "s0",
        "s0 + " * 1000 + "s0",
        "",
        "s0 s1",
        12,
        None,
    ],
)
def test_shape_expression_grammar_refuses(text):
    with pytest.raises(ShapeExprError):
        parse_shape_expr(text)


@pytest.mark.parametrize(
    "text",
    [
        "Mul(Integer(32), Symbol('s77', positive=True, integer=True))",
        "Min(Integer(32), Mul(Integer(32), Symbol('s77', positive=True, integer=True)))",
        "Pow(Symbol('s70', positive=True, integer=True), Integer(2))",
        "2*s0 + 1 - s1",
        "Max(s0, -s1, 4)",
    ],
)
def test_rewritten_expression_means_the_same_to_sympy(text):
    sympy = pytest.importorskip("sympy")
    assert sympy.sympify(parse_shape_expr(text)) == sympy.sympify(text)
