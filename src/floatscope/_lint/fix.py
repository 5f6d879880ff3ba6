"""``--fix``: apply the rewrites that compute the same function, with libcst so the rest of the file is untouched."""

from __future__ import annotations

from floatscope._errors import UsageError
from floatscope._lint.results import Edit

__all__ = ["apply_edits"]


def apply_edits(source: str, edits: list[Edit]) -> tuple[str, int]:
    """The source with each edit's expression replaced, and how many were applied.

    Edits that overlap an applied one are left for the next pass (the caller lints again). Parentheses around a
    replaced expression, comments and whitespace around it are kept, since libcst owns them, not the expression;
    an expression with a comment inside is not replaced (the comment would go with it).
    """
    try:
        import libcst as cst
        from libcst.metadata import MetadataWrapper, PositionProvider
    except ModuleNotFoundError:
        raise UsageError("floatscope lint --fix needs libcst; pip install 'libcst>=1.1'") from None

    by_span = {(e.line, e.col, e.end_line, e.end_col): e for e in edits}
    wrapper = MetadataWrapper(cst.parse_module(source))
    positions = wrapper.resolve(PositionProvider)
    applied: list[tuple[int, int, int, int]] = []

    def overlaps(span: tuple[int, int, int, int]) -> bool:
        return any(not ((span[2], span[3]) <= (a[0], a[1]) or (a[2], a[3]) <= (span[0], span[1])) for a in applied)

    class Rewriter(cst.CSTTransformer):
        def on_leave(self, original: cst.CSTNode, updated: cst.CSTNode) -> cst.CSTNode:  # type: ignore[override]
            if not isinstance(original, cst.BaseExpression):
                return updated
            where = positions.get(original)
            if where is None:
                return updated
            span = (where.start.line, where.start.column, where.end.line, where.end.column)
            edit = by_span.get(span)
            if edit is None or overlaps(span) or _has_comment(wrapper.module.code_for_node(original)):
                return updated
            try:
                new = cst.parse_expression(edit.text)
            except cst.ParserSyntaxError:
                return updated
            if getattr(original, "lpar", None) and hasattr(new, "lpar"):
                new = new.with_changes(lpar=original.lpar, rpar=original.rpar)
            applied.append(span)
            return new

    module = wrapper.module.visit(Rewriter())
    return module.code, len(applied)


def _has_comment(code: str) -> bool:
    if "#" not in code:
        return False
    import io
    import tokenize

    try:
        return any(tok.type == tokenize.COMMENT for tok in tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return True  # cannot tell: keep the code as it is
