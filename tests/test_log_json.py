"""With log_format = "json" every line is one JSON object, library loggers and warnings included."""

import io
import logging
import warnings

import orjson
import structlog

from service.log import configure_logging, get_logger, register_secrets


def test_library_loggers_and_warnings_come_out_as_json_lines_with_secrets_masked():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    stream = io.StringIO()
    try:
        register_secrets(["lib-secret-value"])
        configure_logging("info", "json", stream)
        get_logger("intake").warning("event.dead_lettered", event_id="e1")
        # aiomqtt's own words during a burst of announcements, through the stdlib logger.
        logging.getLogger("mqtt").warning("There are %d pending publish calls.", 11)
        logging.getLogger("aiohttp.access").info("GET /x token=lib-secret-value")
        failure = RuntimeError("boom")
        logging.getLogger("asyncio").error(
            "Future exception was never retrieved",
            exc_info=(RuntimeError, failure, None),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
        logging.getLogger("quiet").debug("below the level: not written")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
    lines = stream.getvalue().splitlines()
    records = [orjson.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    assert [r["event"].splitlines()[0] for r in records] == [
        "event.dead_lettered",
        "There are 11 pending publish calls.",
        "GET /x token=***",
        "Future exception was never retrieved",
        records[4]["event"].splitlines()[0],
    ]
    assert records[1]["logger"] == "mqtt"
    assert records[1]["level"] == "warning"
    assert "RuntimeError: boom" in records[3]["exception"]
    assert "a library deprecation" in records[4]["event"]
    assert "lib-secret-value" not in stream.getvalue()
