"""Expressions: the values a route puts into a template, written as sandboxed Jinja2.

Event payloads come from outside, and route expressions are config, so both run in Jinja's
immutable sandbox: no attribute tricks (`''.__class__`), no mutation of the event, bounded
`range`, and no `*`/`**` that would build a gigabyte string. Undefined is strict, so a field the
event lacks fails the job with a message naming it (`product.image_url is undefined`) instead
of sending a paid export with an empty script.

Two more rules keep a bad event from becoming a bad video:
- A value that is null (`None`) is an error wherever it would be written out; give it a
  fallback with `or` (`{{ product.vendor or "our shop" }}`).
- An expression that is exactly one `{{ ... }}` keeps the type of its value (a number stays a
  number, a list a list), so it can set non-string template fields; anything else renders to a
  string. Autoescape is off: the output is JSON values, not HTML.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, UndefinedError, nodes
from jinja2.environment import Template, TemplateExpression
from jinja2.exceptions import SecurityError
from jinja2.lexer import Token, TokenStream
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from jinja2.runtime import Context

MAX_REPEAT = 100_000  # longest string or list `*` may build
MAX_EXPONENT = 100


class MappingError(Exception):
    """An expression that cannot be compiled or evaluated; the message names the field."""


# --- filters ---------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt"),
        *("figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header"),
        *("hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td", "th", "tr"),
        "ul",
    }
)
_SKIPPED_TAGS = frozenset({"script", "style", "template"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:  # noqa: ARG002 - HTMLParser signature
        if tag in _SKIPPED_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_html(value: object) -> str:
    """Product HTML -> plain text an avatar can read: tags out, entities decoded, spaces folded.

    Block elements become spaces (`<p>a</p><p>b</p>` -> "a b"), inline ones vanish
    (`<b>fo</b>o` -> "foo"), script and style content is dropped.
    """
    if value is None:
        return ""
    extractor = _TextExtractor()
    extractor.feed(str(value))
    extractor.close()
    text = html.unescape("".join(extractor.parts))
    return " ".join(text.split())


def truncate_words(value: object, count: int, end: str = "…") -> str:
    """Keep the first `count` words, so a long description still fits a short script."""
    words = str(value).split()
    if len(words) <= count:
        return " ".join(words)
    return " ".join(words[:count]).rstrip(",;:-\u2013\u2014") + end


_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "KRW": "₩", "INR": "₹"}
_NO_MINOR_UNITS = frozenset({"JPY", "KRW"})


def money(value: object, currency: str | None = None) -> str:
    """Spell a price as a viewer reads it, without depending on the host's locale.

    Known currencies get their sign in front (`$19.99`, `€5.00`), others the code after
    (`19.99 CHF`), no currency just the number. Commas group thousands.
    """
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"money: {value!r} is not a number") from None
    if not amount.is_finite():
        raise ValueError(f"money: {value!r} is not a number")
    code = (currency or "").strip().upper()
    places = 0 if code in _NO_MINOR_UNITS else 2
    number = f"{abs(amount):,.{places}f}"
    sign = "-" if amount < 0 else ""
    if code in _SYMBOLS:
        return f"{sign}{_SYMBOLS[code]}{number}"
    return f"{sign}{number} {code}".rstrip()


# --- environment -----------------------------------------------------------------------


def _refuse_null(value: object) -> object:
    if value is None:
        raise _NullValueError
    return value


class _NullValueError(Exception):
    """Raised while rendering a None; turned into a MappingError naming the field."""


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on the two operators that can exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:  # noqa: ANN401 - Jinja's signature
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent above {MAX_EXPONENT} is not allowed")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_REPEAT
                ):
                    raise SecurityError(f"repeating a sequence past {MAX_REPEAT} items")
        return super().call_binop(context, operator, left, right)


def _make_environment() -> _Environment:
    env = _Environment(
        undefined=StrictUndefined,
        autoescape=False,
        finalize=_refuse_null,
        keep_trailing_newline=True,
    )
    env.filters["strip_html"] = strip_html
    env.filters["truncate_words"] = truncate_words
    env.filters["money"] = money
    return env


_ENV = _make_environment()


# --- compiling -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression; `native` is set when it is one `{{ ... }}` that keeps its type."""

    text: str
    template: Template = field(repr=False, compare=False)
    native: TemplateExpression | None = field(default=None, repr=False, compare=False)
    chains: tuple[tuple[str | int, ...], ...] = field(default=(), repr=False, compare=False)


class _TokenPositions:
    """Remembers where each token starts; Jinja reports only the line of a syntax error."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.last = (1, 0)  # start of the last raw token read: a lexer error is right after it
        self.starts: dict[int, tuple[int, int]] = {}
        self.lexer_failed = False

    def raw(self) -> Iterator[tuple[int, str, str]]:
        line, col = 1, 0
        try:
            for lineno, token, value in _ENV.lexer.tokeniter(self.source, None):
                self.last = (line, col)
                yield lineno, token, value
                if "\n" in value:
                    line += value.count("\n")
                    col = len(value) - value.rfind("\n") - 1
                else:
                    col += len(value)
        except TemplateSyntaxError:
            self.lexer_failed = True
            self.last = (line, col)
            raise
        self.last = (line, col)

    def tokens(self) -> Iterator[Token]:
        for token in _ENV.lexer.wrap(self.raw()):
            self.starts[id(token)] = self.last
            yield token

    def position_of(self, current: Token) -> tuple[int, int]:
        """1-based line and column of the failing token (or character, for lexer errors)."""
        line, col = self.last if self.lexer_failed else self.starts.get(id(current), self.last)
        lines = self.source.split("\n")
        text = lines[line - 1] if line <= len(lines) else ""
        while col < len(text) and text[col].isspace():
            col += 1
        return line, col + 1


def _parse(source: str, column_offset: int = 0) -> nodes.Template:
    """Parse, reporting a syntax error with its line and column."""
    positions = _TokenPositions(source)
    parser = Parser(_ENV, source)
    parser.stream = TokenStream(positions.tokens(), None, None)
    try:
        return parser.parse()
    except TemplateSyntaxError as exc:
        line, col = positions.position_of(parser.stream.current)
        if line == 1:
            col = max(col - column_offset, 1)
        raise MappingError(f"syntax error at line {line}, column {col}: {exc.message}") from None


def _chains(node: nodes.Node) -> set[tuple[str | int, ...]]:
    """Dotted field paths the expression reads from its context (`product.image_url`).

    Names the expression binds itself (loop variables, `set`) are left out: they are not
    fields of the event.
    """
    local = {n.name for n in node.find_all(nodes.Name) if n.ctx in {"store", "param"}}
    found: set[tuple[str | int, ...]] = set()
    for sub in node.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        chain = _chain_of(sub)
        if chain and chain[0] not in local:
            found.add(chain)
    return found


def _chain_of(node: nodes.Node) -> tuple[str | int, ...] | None:
    if isinstance(node, nodes.Name):
        return (node.name,)
    if isinstance(node, nodes.Getattr):
        parent = _chain_of(node.node)
        return None if parent is None else (*parent, node.attr)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        key = node.arg.value
        parent = _chain_of(node.node)
        if parent is None or not isinstance(key, str | int):
            return None
        return (*parent, key)
    return None


def _native_of(ast: nodes.Template) -> TemplateExpression | None:
    """Build a typed evaluator when the whole text is one `{{ expr }}`."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    outputs = ast.body[0].nodes
    if len(outputs) != 1 or isinstance(outputs[0], nodes.TemplateData):
        return None
    body: list[nodes.Node] = [nodes.Assign(nodes.Name("result", "store"), outputs[0], lineno=1)]
    template = _ENV.from_string(nodes.Template(body, lineno=1))
    return TemplateExpression(template, undefined_to_none=False)


def compile_expression(text: str) -> Expression:
    """Compile a patch value; raise MappingError with line and column on a syntax error."""
    return _compile(text, text)


def compile_condition(text: str) -> Expression:
    """Compile a route `when`: a bare expression (`product.status == 'active'`) or `{{ ... }}`."""
    if "{{" in text or "{%" in text:
        return _compile(text, text)
    return _compile(text, "{{ " + text + " }}", column_offset=3)


def _compile(text: str, source: str, column_offset: int = 0) -> Expression:
    ast = _parse(source, column_offset)
    try:
        template, native = _ENV.from_string(ast), _native_of(ast)
    except TemplateSyntaxError as exc:  # an unknown filter or test, found when compiling
        raise MappingError(f"error at line {exc.lineno}: {exc.message}") from None
    return Expression(
        text=text,
        template=template,
        native=native,
        chains=tuple(sorted(_chains(ast), key=lambda c: (len(c), str(c)))),
    )


# --- evaluating ------------------------------------------------------------------------

_MISSING = object()


def _dotted(chain: tuple[str | int, ...]) -> str:
    text = str(chain[0])
    for part in chain[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _lookup(context: Mapping[str, Any], chain: tuple[str | int, ...]) -> tuple[int, object]:
    """How many parts of `chain` resolve in `context`, and the value reached."""
    node: object = context
    for depth, part in enumerate(chain):
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = (
            isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node)
        )
        if not (in_mapping or in_list):
            return depth, _MISSING
        node = node[part]  # type: ignore[index]
    return len(chain), node


def _diagnose(expr: Expression, context: Mapping[str, Any], *, null: bool) -> str | None:
    """Name the first field the expression reads that is missing (or null)."""
    for chain in expr.chains:
        depth, value = _lookup(context, chain)
        if value is _MISSING and not null and (depth > 0 or chain[0] not in _ENV.globals):
            return f"{_dotted(chain[: depth + 1])} is undefined"
        if null and value is None:
            return f"{_dotted(chain)} is null; give it a fallback with `or`"
    return None


def _check_native(value: object, where: str) -> Any:  # noqa: ANN401 - a JSON value
    """Check a whole-expression result; null is allowed only inside (payloads have them)."""
    if value is None:
        raise _NullValueError
    return _check_json(value, where)


def _check_json(value: object, where: str) -> Any:  # noqa: ANN401 - a JSON value
    if isinstance(value, Undefined):
        str(value)  # raises the undefined or security error it carries
    if value is None or isinstance(value, str | bool | int | float):
        return str(value) if isinstance(value, str) else value  # str() drops Markup
    if isinstance(value, list | tuple):
        return [_check_json(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _check_json(v, where) for k, v in value.items()}
    raise MappingError(f"{where}: the value is a {type(value).__name__}, not a JSON value")


def _run(expr: Expression, context: Mapping[str, Any], render: Callable[[], Any]) -> Any:  # noqa: ANN401 - a JSON value
    try:
        return render()
    except MappingError:
        raise
    except _NullValueError:
        reason = _diagnose(expr, context, null=True) or "a value is null"
        raise MappingError(f"{reason} (in {expr.text!r})") from None
    except SecurityError as exc:
        raise MappingError(f"not allowed: {exc} (in {expr.text!r})") from None
    except Exception as exc:
        reason = None
        if isinstance(exc, UndefinedError):
            reason = _diagnose(expr, context, null=False)
        reason = reason or f"{type(exc).__name__}: {exc}"
        raise MappingError(f"{reason} (in {expr.text!r})") from exc


def evaluate(expr: Expression, context: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a JSON value
    """Compute the value for one event: a JSON value, or MappingError saying why not."""
    native = expr.native
    if native is not None:
        return _run(expr, context, lambda: _check_native(native(**context), expr.text))
    return _run(expr, context, lambda: expr.template.render(**context))


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def evaluate_condition(expr: Expression, context: Mapping[str, Any]) -> bool:
    """Decide a route's `when`; text that is not clearly true or false is an error, not False."""
    native = expr.native
    if native is not None:
        return bool(_run(expr, context, lambda: _truth(native(**context))))
    text = evaluate(expr, context)
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise MappingError(f"condition rendered {text!r}, not true or false (in {expr.text!r})")


def _truth(value: object) -> bool:
    if isinstance(value, Undefined):
        str(value)  # raises what it carries
    return bool(value)
