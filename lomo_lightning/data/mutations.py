"""Rejected Python bodies for preference pairs: the chosen body with one small mutation that still parses.

Each mutation edits the source text at one place found with ``ast`` (the rest of the text, comments and
formatting included, stays byte for byte), so the two responses differ only where the meaning does:

- ``comparison``: a comparison operator negated (``<`` / ``>=``, ``==`` / ``!=``, ``in`` / ``not in``, ``is`` / ``is not``);
- ``boolean``: ``and`` / ``or`` swapped in one boolean expression;
- ``constant``: an integer constant off by one;
- ``not``: a ``not`` dropped;
- ``branches``: the two branches of an ``if``/``else`` statement or of a conditional expression swapped;
- ``arguments``: the first two positional arguments of a call swapped;
- ``returned_name``: a returned name replaced by another name the body assigns.

A mutant counts only if it parses and its syntax tree differs from the chosen body's.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Iterator

# (start, end, replacement) in the body's UTF-8 bytes; one mutation may edit several spans (swaps)
Edit = list[tuple[int, int, bytes]]

NEGATED_COMPARISONS: dict[type, tuple[str, str]] = {
    ast.Lt: (r"<(?![<=])", ">="),
    ast.GtE: (r">=", "<"),
    ast.Gt: (r"(?<![-=>])>(?![>=])", "<="),
    ast.LtE: (r"<=", ">"),
    ast.Eq: (r"==", "!="),
    ast.NotEq: (r"!=", "=="),
    ast.In: (r"(?<![\w])in(?![\w])", "not in"),
    ast.NotIn: (r"not\s+in", "in"),
    ast.Is: (r"(?<![\w])is(?![\w])", "is not"),
    ast.IsNot: (r"is\s+not", "is"),
}


def mutated_bodies(body: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``count`` different ``(kind, mutated body)`` of ``body``, one mutation each, chosen seeded by ``seed`` and ``body``.

    Kinds are drawn in turn (one of each before a second of any), so that a function's mutants vary.
    """
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return []
    source = body.encode()
    offsets = _line_offsets(source)
    original = ast.dump(tree)
    by_kind: dict[str, list[Edit]] = {}
    for kind, edit in _candidate_edits(tree, source, offsets):
        by_kind.setdefault(kind, []).append(edit)
    generator = random.Random(f"{seed}\0{body}")  # a str seed hashes with sha512: the same in every process
    for edits in by_kind.values():
        generator.shuffle(edits)
    kinds = sorted(by_kind)
    generator.shuffle(kinds)
    mutants: list[tuple[str, str]] = []
    seen = {body}
    while len(mutants) < count and any(by_kind.values()):
        for kind in kinds:
            if not by_kind[kind] or len(mutants) == count:
                continue
            mutant = _apply(source, by_kind[kind].pop())
            if mutant is not None and mutant not in seen and _parses_differently(mutant, original):
                seen.add(mutant)
                mutants.append((kind, mutant))
    return mutants


def _parses_differently(text: str, original: str) -> bool:
    try:
        return ast.dump(ast.parse(text)) != original
    except SyntaxError:
        return False


def _apply(source: bytes, edit: Edit) -> str | None:
    result = source
    for start, end, replacement in sorted(edit, reverse=True):  # back to front: earlier offsets stay valid
        result = result[:start] + replacement + result[end:]
    try:
        return result.decode()
    except UnicodeDecodeError:
        return None


def _line_offsets(source: bytes) -> list[int]:
    """The byte offset of each line's start (index ``lineno - 1``), as ``ast``'s byte columns count."""
    offsets = [0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def _span(node: ast.AST, offsets: list[int]) -> tuple[int, int]:
    start = offsets[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
    end = offsets[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]
    return start, end


def _candidate_edits(tree: ast.AST, source: bytes, offsets: list[int]) -> Iterator[tuple[str, Edit]]:
    assigned = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)})
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and type(node.ops[0]) in NEGATED_COMPARISONS:
            pattern, replacement = NEGATED_COMPARISONS[type(node.ops[0])]
            gap_start, gap_end = _span(node.left, offsets)[1], _span(node.comparators[0], offsets)[0]
            matches = list(re.finditer(pattern.encode(), source[gap_start:gap_end]))
            if len(matches) == 1:  # the operator alone between its operands (parentheses and spaces aside)
                match = matches[0]
                yield "comparison", [(gap_start + match.start(), gap_start + match.end(), replacement.encode())]
        elif isinstance(node, ast.BoolOp):
            word, other = (b"and", b"or") if isinstance(node.op, ast.And) else (b"or", b"and")
            edit: Edit = []
            for left, right in zip(node.values, node.values[1:]):
                gap_start, gap_end = _span(left, offsets)[1], _span(right, offsets)[0]
                matches = list(re.finditer(rb"(?<![\w])" + word + rb"(?![\w])", source[gap_start:gap_end]))
                if len(matches) != 1:
                    break
                edit.append((gap_start + matches[0].start(), gap_start + matches[0].end(), other))
            else:
                yield "boolean", edit
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            start, end = _span(node, offsets)
            yield "constant", [(start, end, str(node.value + 1).encode())]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start, end = _span(node, offsets)
            operand_start = _span(node.operand, offsets)[0]
            text = source[start:operand_start]
            if re.fullmatch(rb"not[\s(]*", text):  # drop the keyword, keep any parenthesis before the operand
                yield "not", [(start, start + len(text.rstrip(b"(")), b"")]
        elif isinstance(node, ast.IfExp):
            body, orelse = _span(node.body, offsets), _span(node.orelse, offsets)
            yield "branches", [(*body, source[orelse[0] : orelse[1]]), (*orelse, source[body[0] : body[1]])]
        elif isinstance(node, ast.If) and node.orelse and not _is_elif(node, source, offsets):
            body = (offsets[node.body[0].lineno - 1], offsets[node.body[-1].end_lineno])  # type: ignore[index]
            orelse = (offsets[node.orelse[0].lineno - 1], offsets[node.orelse[-1].end_lineno])  # type: ignore[index]
            if body[1] <= orelse[0] and _starts_lines(node, source, offsets):
                yield "branches", [(*body, source[orelse[0] : orelse[1]]), (*orelse, source[body[0] : body[1]])]
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]):
            first, second = _span(node.args[0], offsets), _span(node.args[1], offsets)
            if source[first[0] : first[1]] != source[second[0] : second[1]]:
                yield "arguments", [(*first, source[second[0] : second[1]]), (*second, source[first[0] : first[1]])]
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            others = [name for name in assigned if name != node.value.id]
            if others:
                start, end = _span(node.value, offsets)
                name = others[(node.lineno + len(node.value.id)) % len(others)]
                yield "returned_name", [(start, end, name.encode())]


def _is_elif(node: ast.If, source: bytes, offsets: list[int]) -> bool:
    first = node.orelse[0]
    return isinstance(first, ast.If) and source[offsets[first.lineno - 1] :].lstrip().startswith(b"elif")


def _starts_lines(node: ast.If, source: bytes, offsets: list[int]) -> bool:
    """Whether both blocks are whole lines (not ``if x: a`` on one line), so whole lines can be swapped."""
    return node.body[0].lineno > node.lineno and node.orelse[0].lineno > node.body[-1].end_lineno  # type: ignore[operator]


def shuffled_lines(text: str, seed: int = 0) -> str | None:
    """``text`` with its lines in another order (seeded by ``seed`` and the text), or ``None`` if no other order exists.

    The easy rejected body of the ``shuffled_lines`` smoke option: it mostly does not parse.
    """
    lines = text.splitlines()
    if len(set(lines)) < 2:
        return None
    generator = random.Random(f"{seed}\0{text}")
    order = lines[:]
    while order == lines:
        generator.shuffle(order)
    return "\n".join(order) + "\n"


__all__ = ["NEGATED_COMPARISONS", "mutated_bodies", "shuffled_lines"]
