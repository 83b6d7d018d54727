"""Size expressions in the manner of zram-generator: ``"ram / 2"``, ``"min(ram / 2, 4G)"``.

The grammar is small and closed, and nothing is ever handed to ``eval()``: the text is
parsed with `ast` (after each size literal is swapped for a placeholder name, since ``4G`` is
no Python) and the tree is walked, allowing only

* size literals: a number with an optional decimal point and optional unit K, M, G, T or P
  (1024-based, optionally followed by B or iB, any case), as `tierswap.config.parse_size`;
* the names the caller offers (``ram``: the machine's MemTotal in bytes);
* ``+``, ``-``, ``*``, ``/``, unary ``-`` and ``+``, parentheses;
* ``min(a, b, ...)`` and ``max(a, b, ...)`` with at least one argument.

Arithmetic is exact (`fractions.Fraction`); the result is rounded down to whole bytes. Limits:
at most MAX_TEXT characters, so no expression can build a huge number or a deep tree; the
caller checks the range of the result. Every error is a `ValueError` with one line of text.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from fractions import Fraction

MAX_TEXT = 200
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# a number, not part of a name or of another number, with an optional unit
_LITERAL = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[ \t]*([kmgtp]?)(?:i?b)?(?![\w.])", re.I)
_FUNCS: dict[str, Callable[..., Fraction]] = {"min": min, "max": max}
_BINOPS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}

Value = int | Callable[[], int]


def looks_like_expression(text: str) -> bool:
    """True for text that is meant as an expression rather than a plain size."""
    return any(c in text for c in "+-*/(),") or bool(re.search(r"[a-z_]{2,}", text, re.I))


def evaluate(text: str, names: Mapping[str, Value]) -> int:
    """Whole bytes of `text`; `names` maps each allowed name to its value (or to a function
    giving it, called only when the expression uses the name)."""
    if len(text) > MAX_TEXT:
        raise ValueError(f"expression longer than {MAX_TEXT} characters")
    if re.search(r"_lit\d", text):
        raise ValueError("unknown name (names starting _lit are reserved)")
    literals: dict[str, Fraction] = {}

    def swap(m: re.Match[str]) -> str:
        key = f"_lit{len(literals)}"
        literals[key] = Fraction(m.group(1)) * _UNITS[m.group(2).lower()]
        return key

    try:
        tree = ast.parse(_LITERAL.sub(swap, text).strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("not a size expression (numbers with K/M/G/T/P, names, "
                         "+ - * /, min(), max(), parentheses)") from None
    cache: dict[str, Fraction] = {}

    def name(n: str) -> Fraction:
        if n in literals:
            return literals[n]
        if n not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ValueError(f"unknown name {n!r} (known: {known})")
        if n not in cache:
            v = names[n]
            cache[n] = Fraction(v() if callable(v) else v)
        return cache[n]

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Name):
            return name(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and not node.keywords and node.args
                and not any(isinstance(a, ast.Starred) for a in node.args)):
            return _FUNCS[node.func.id](walk(a) for a in node.args)
        what = type(node).__name__
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            what = f"{node.func.id}()"
        elif isinstance(node, ast.BinOp | ast.UnaryOp):
            what = f"operator {type(node.op).__name__}"
        raise ValueError(f"{what} is not allowed (use numbers with K/M/G/T/P, names, "
                         "+ - * /, min(), max(), parentheses)")

    try:
        result = walk(tree)
    except RecursionError:
        raise ValueError("expression nested too deeply") from None
    return int(result // 1)
