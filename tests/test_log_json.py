"""With log_format = "json" every line is one JSON object, library loggers and warnings included.

Run in a child process: logging and warnings are process-wide, and what counts is what the
process writes, not what one test's capture sees.
"""

import subprocess
import sys

import orjson

EMIT = """
import logging, warnings
from service.log import configure_logging, get_logger, register_secrets
register_secrets(["lib-secret-value"])
configure_logging("info", "json")
get_logger("intake").warning("event.dead_lettered", event_id="e1")
# aiomqtt's own words during a burst of announcements, through the stdlib logger.
logging.getLogger("mqtt").warning("There are %d pending publish calls.", 11)
logging.getLogger("aiohttp.server").warning("GET /x token=lib-secret-value")
# One access line per request is for debugging (README, Logs): not written at info.
logging.getLogger("aiohttp.access").info("GET /y")
failure = RuntimeError("boom")
logging.getLogger("asyncio").error(
    "Future exception was never retrieved", exc_info=(RuntimeError, failure, None)
)
warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
logging.getLogger("quiet").debug("below the level: not written")
"""


def test_library_loggers_and_warnings_come_out_as_json_lines_with_secrets_masked():
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", EMIT], capture_output=True, check=True, timeout=30
    )
    assert run.stdout == b""
    lines = run.stderr.decode().splitlines()
    records = [orjson.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    assert [r["event"].splitlines()[0] for r in records[:4]] == [
        "event.dead_lettered",
        "There are 11 pending publish calls.",
        "GET /x token=***",
        "Future exception was never retrieved",
    ]
    assert len(records) == 5
    assert records[1]["logger"] == "mqtt"
    assert records[1]["level"] == "warning"
    assert "RuntimeError: boom" in records[3]["exception"]
    assert "a library deprecation" in records[4]["event"]
    assert records[4]["logger"] == "py.warnings"
    assert b"lib-secret-value" not in run.stderr
