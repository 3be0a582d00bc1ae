from datetime import UTC, datetime

from service.retry_after import parse_retry_after


def test_retry_after_accepts_seconds_and_http_dates():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("2.5", now=now) == 2.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("Wed, 15 Nov 2023 00:00:10 GMT", 1_700_006_400.0) == 10.0
    assert parse_retry_after("Wed, 15 Nov 2023 00:00:10 GMT", 1_800_000_000.0) == 0.0


def test_retry_after_that_says_nothing_usable_is_none():
    assert parse_retry_after(None) is None
    assert parse_retry_after("   ") is None
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after("nan", 0.0) is None
