"""Griffe extension: turn the reStructuredText bits of the docstrings into Markdown for the site.

The modules write math and cross-references the Sphinx way (``:math:`\\beta```,
``.. math::`` blocks, ``:class:`~pkg.Name```), which Markdown would print verbatim.
This rewrites them, at load time and for the docs only, into arithmatex math
(``\\( \\)`` inline, ``$$`` blocks) and inline code, and names the ``Example:``
sections ``Examples:`` so that griffe renders them as code, and joins Args entries whose
parameter names wrap onto a second line; the source stays untouched.
"""
from __future__ import annotations

import re
import textwrap

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc):`(~?)([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
# Griffe reads "Examples:" as doctest code but "Example:" as a prose admonition.
_EXAMPLE_SECTION = re.compile(r"^Example:[ \t]*$", re.M)
# An Args entry naming several parameters over two lines ("a, b,\n    c: text"): griffe
# needs the names on one line.
_WRAPPED_NAMES = re.compile(r"^( +)((?:\w+, )*\w+,)\n +(?=(?:\w+, )*\w+:)", re.M)


def _role_to_code(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _math_blocks(text: str) -> str:
    """Replace every ``.. math::`` directive and its indented body by a ``$$`` block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        directive = _MATH_DIRECTIVE.match(lines[i])
        if not directive:
            out.append(lines[i])
            i += 1
            continue
        indent, body = directive["indent"], []
        i += 1
        # The body is every following line that is blank or indented deeper than the directive.
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        trailing_blank = body and not body[-1].strip()
        formula = textwrap.dedent("\n".join(body)).strip("\n")
        out += [f"{indent}$$"] + [f"{indent}{line}" for line in formula.splitlines()] + [f"{indent}$$"]
        if trailing_blank:
            out.append("")
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """Markdown for a docstring written with Sphinx math and cross-reference roles."""
    text = _EXAMPLE_SECTION.sub("Examples:", _math_blocks(text))
    text = _WRAPPED_NAMES.sub(r"\1\2 ", text)
    text = _INLINE_MATH.sub(lambda m: rf"\({m.group(1)}\)", text)
    return _ROLE.sub(_role_to_code, text)


class RstRolesToMarkdown(griffe.Extension):
    """Rewrite every loaded docstring with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
