import io

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from service.log import (
    REDACTED,
    configure_logging,
    get_logger,
    printable_url,
    register_secrets,
)

CANARY = "canary-7f3a9c1e-secret"


def log_lines(emit):
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        emit(structlog.get_logger("test"))
    finally:
        configure_logging("info", "console")
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_registered_secret_is_masked_wherever_it_appears():
    register_secrets([CANARY])
    (line,) = log_lines(
        lambda log: log.info(
            f"failed with {CANARY}",  # noqa: G004 - a secret inside the message text is the case
            detail={"url": f"https://x/?k={CANARY}"},
            items=[CANARY],
        )
    )
    assert CANARY not in orjson.dumps(line).decode()
    assert line["event"] == f"failed with {REDACTED}"
    assert line["detail"] == {"url": f"https://x/?k={REDACTED}"}
    assert line["items"] == [REDACTED]


def test_secret_named_keys_are_masked_even_when_unregistered():
    (line,) = log_lines(
        lambda log: log.warning(
            "auth", token="t-1", api_key="k-1", headers={"Authorization": "Bearer z"}, job_id="j"
        )
    )
    assert line["token"] == REDACTED
    assert line["api_key"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED}
    assert line["job_id"] == "j"
    assert line["level"] == "warning"


def test_bound_context_is_on_every_line():
    def emit(log):
        with structlog.contextvars.bound_contextvars(job_id="job_1", event_id="evt_1"):
            log.info("one")
            log.info("two")

    lines = log_lines(emit)
    assert [(x["event"], x["job_id"], x["event_id"]) for x in lines] == [
        ("one", "job_1", "evt_1"),
        ("two", "job_1", "evt_1"),
    ]


@pytest.mark.parametrize(
    ("url", "printed"),
    [
        ("sqlite:////var/lib/studiohook.db", "sqlite:////var/lib/studiohook.db"),
        ("sqlite:///state/studiohook.db", "sqlite:///state/studiohook.db"),
        (
            "postgresql://db:5432/hooks?sslmode=require",
            "postgresql://db:5432/hooks?sslmode=require",
        ),
        ("postgresql://app:s3cret@db/hooks", "postgresql://db/hooks"),
        ("postgresql://app:s3@cr3t@db/hooks", "postgresql://db/hooks"),  # an unescaped @
        ("postgresql://app@[::1]:5432/hooks", "postgresql://[::1]:5432/hooks"),
        ("https://tok3n@api.example.com/v3", "https://api.example.com/v3"),  # a bare token
        (
            "postgresql://db/hooks?sslmode=require&password=s3cret",
            f"postgresql://db/hooks?sslmode=require&password={REDACTED}",
        ),
        (
            "https://api.example.com/x?api_key=s3cret",
            f"https://api.example.com/x?api_key={REDACTED}",
        ),
        ("https://api.example.com/x#access_token=s3cret", "https://api.example.com/x"),
        ("http://[::1:s3cret@host", REDACTED),  # does not parse: nothing of it is printed
    ],
)
def test_a_printable_url_keeps_where_and_drops_every_credential(url, printed):
    assert printable_url(url) == printed


def test_a_component_logger_follows_every_reconfiguration():
    """get_logger keeps what it assembled, but only until logging is configured again."""
    log = get_logger("component-test")
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("info", "json", stream=first)
        log.info("one")
        log.debug("dropped at info")
        configure_logging("debug", "json", stream=second)
        log.debug("two")
    finally:
        configure_logging("info", "console")
    assert [orjson.loads(x)["event"] for x in first.getvalue().splitlines()] == ["one"]
    (line,) = [orjson.loads(x) for x in second.getvalue().splitlines()]
    assert (line["event"], line["level"], line["component"]) == ("two", "debug", "component-test")


def test_a_component_logger_is_seen_by_capture_logs():
    log = get_logger("component-test")
    log.info("assembled before the capture")
    with capture_logs() as logs:
        log.warning("captured")
    assert [(e["event"], e["component"]) for e in logs] == [("captured", "component-test")]
