import pytest

from service.mapping.render import (
    MappingError,
    compile_condition,
    compile_expression,
    evaluate,
    evaluate_condition,
    money,
    strip_html,
    truncate_words,
)

CONTEXT = {
    "product": {
        "title": "Oak Lamp",
        "price": "64.9",
        "currency": "CHF",
        "image_url": None,
        "description": "<p>Warm &amp; <b>bright</b></p><p>light</p>",
        "tags": ["oak", "lamp"],
    },
    "event": {"status": "active", "variants": [{"price": "1.00", "compare_at_price": None}]},
}


def run(text, context=CONTEXT):
    return evaluate(compile_expression(text), context)


def test_text_with_filters():
    text = "{{ product.title }} now {{ product.price | money(product.currency) }}"
    assert run(text) == "Oak Lamp now 64.90 CHF"


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Warm &amp; <b>bri</b>ght</p><p>light</p>", "Warm & bright light"),
        ("a<br>b&nbsp;c &eacute;", "a b\xa0c é".replace("\xa0", " ")),
        ("<style>p{}</style><script>x()</script>Shown", "Shown"),
        ("  plain\n\n text ", "plain text"),
        (None, ""),
    ],
)
def test_strip_html(html, text):
    assert strip_html(html) == text


def test_truncate_words():
    assert truncate_words("one two, three four", 2) == "one two…"
    assert truncate_words("one two", 2) == "one two"
    assert truncate_words("one two three", 1, end="...") == "one..."


@pytest.mark.parametrize(
    ("value", "currency", "text"),
    [
        ("19.99", "USD", "$19.99"),
        (5, "eur", "€5.00"),
        ("19.99", "CHF", "19.99 CHF"),
        ("1299", "GBP", "£1,299.00"),
        ("1500", "JPY", "¥1,500"),
        ("-2.5", "USD", "-$2.50"),
        ("7.1", None, "7.10"),
    ],
)
def test_money(value, currency, text):
    assert money(value, currency) == text


def test_money_refuses_non_numbers():
    with pytest.raises(MappingError, match="not a number"):
        run("{{ event.status | money('USD') }}")


def test_whole_expression_keeps_its_type():
    assert run("{{ product.price | float }}") == 64.9
    assert run("{{ product.tags }}") == ["oak", "lamp"]
    assert run("{{ event.variants[0] }}") == {"price": "1.00", "compare_at_price": None}
    assert run(" {{ product.price | float }}") == " 64.9"


def test_strict_undefined_names_the_field():
    with pytest.raises(MappingError, match=r"product\.image_urll is undefined"):
        run("{{ product.image_urll }}")
    with pytest.raises(MappingError, match=r"^prodcut is undefined"):
        run("Buy {{ prodcut.title }}")
    with pytest.raises(MappingError, match=r"event\.variants\[3\] is undefined"):
        run("{{ event.variants[3].price }}")


def test_null_is_an_error_naming_the_field_unless_given_a_fallback():
    with pytest.raises(MappingError, match=r"product\.image_url is null"):
        run("{{ product.image_url }}")
    with pytest.raises(MappingError, match=r"product\.image_url is null"):
        run("See {{ product.image_url }}")
    assert run("{{ product.image_url or 'https://x/y.png' }}") == "https://x/y.png"


@pytest.mark.parametrize(
    "text",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "x {{ product.title.__class__ }}",
        "{{ event.variants.append(1) }}",
        "{{ 'a' * 1000000 }}",
        "{{ 10 ** 1000 }}",
        "{{ range(1000000) | list }}",
    ],
)
def test_sandbox_escapes_and_resource_abuse_are_blocked(text):
    with pytest.raises(MappingError):
        run(text)
    assert CONTEXT["event"]["variants"] == [{"price": "1.00", "compare_at_price": None}]


def test_non_json_results_are_refused():
    with pytest.raises(MappingError, match="not a JSON value"):
        run("{{ product.items }}")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("{{ product.title", "line 1, column 17"),
        ("Hello {{ a b }}", "line 1, column 12"),
        ("a\n{{ b +* c }}", "line 2, column 7"),
        ("{{ x ! y }}", "line 1, column 6"),
    ],
)
def test_syntax_errors_report_line_and_column(text, where):
    with pytest.raises(MappingError, match="syntax error at " + where):
        compile_expression(text)


def test_unknown_filter_is_a_compile_error():
    with pytest.raises(MappingError, match="No filter named 'nope'"):
        compile_expression("{{ x | nope }}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("event.status == 'active'", True),
        ("event.status == 'draft'", False),
        ("product.price | float > 50", True),
        ("{{ event.status == 'active' }}", True),
        ("{% if product.tags %}yes{% endif %}", True),
        ("{% if not product.tags %}yes{% endif %}", False),
    ],
)
def test_conditions(text, expected):
    assert evaluate_condition(compile_condition(text), CONTEXT) is expected


def test_condition_errors():
    with pytest.raises(MappingError, match=r"event\.state is undefined"):
        evaluate_condition(compile_condition("event.state == 'x'"), CONTEXT)
    with pytest.raises(MappingError, match="not true or false"):
        evaluate_condition(compile_condition("{{ product.title }} x"), CONTEXT)
    with pytest.raises(
        MappingError, match="line 1, column 14: expected token 'end of print statement', got '='"
    ):
        compile_condition("event.status = 'x'")
