from typing import ClassVar

import pytest

from service.backoff import backoff_delay
from service.ingress.mqtt import (
    AckSequencer,
    UnreadablePayloadError,
    group_size,
    matches,
    parse_payload,
    user_properties,
)
from tests.support.fakes import Pinned


def test_sequencer_releases_in_arrival_order_when_commits_finish_out_of_order():
    seq: AckSequencer[str] = AckSequencer()
    a, b, c, d = (seq.arrived(x) for x in "abcd")
    assert seq.committed(c) == []
    assert seq.committed(b) == []
    assert seq.committed(a) == ["a", "b", "c"]
    assert len(seq) == 1
    assert seq.committed(d) == ["d"]
    assert len(seq) == 0


def test_sequencer_holds_everything_behind_an_uncommitted_head():
    seq: AckSequencer[int] = AckSequencer()
    tickets = [seq.arrived(i) for i in range(5)]
    for ticket in tickets[1:]:
        assert seq.committed(ticket) == []
    assert len(seq) == 5
    assert seq.committed(tickets[0]) == [0, 1, 2, 3, 4]


def test_a_group_takes_every_waiting_message_while_there_is_room():
    assert group_size(waiting=0, in_flight=0, limit=100) == 1
    assert group_size(waiting=40, in_flight=0, limit=100) == 41
    assert group_size(waiting=40, in_flight=59, limit=100) == 41


def test_a_group_stops_at_the_in_flight_limit_and_always_takes_the_message_in_hand():
    assert group_size(waiting=40, in_flight=60, limit=100) == 40
    assert group_size(waiting=500, in_flight=0, limit=100) == 100
    assert group_size(waiting=5, in_flight=99, limit=100) == 1
    assert group_size(waiting=5, in_flight=100, limit=100) == 1  # never called so: it waits
    assert group_size(waiting=5, in_flight=0, limit=1) == 1


def test_backoff_grows_doubling_up_to_the_cap():
    top = Pinned(1.0)
    ceilings = [backoff_delay(n, base_s=0.5, cap_s=4.0, rng=top) for n in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_is_full_jitter_from_zero_and_none_before_the_first_retry():
    assert backoff_delay(3, base_s=1.0, cap_s=30.0, rng=Pinned(0.0)) == 0.0
    assert backoff_delay(3, base_s=1.0, cap_s=30.0, rng=Pinned(1.0)) == 4.0
    assert backoff_delay(0, base_s=1.0, cap_s=30.0, rng=Pinned(1.0)) == 0.0
    assert backoff_delay(10_000, base_s=1.0, cap_s=30.0, rng=Pinned(1.0)) == 30.0


def test_parse_payload_accepts_any_json_value():
    assert parse_payload(b'{"id": "x", "n": [1, 2]}') == {"id": "x", "n": [1, 2]}
    assert parse_payload(b"42") == 42


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe{}", "payload is not UTF-8"),
        (b"{not json", "payload is not JSON"),
        (b"", "payload is not JSON"),
    ],
)
def test_parse_payload_names_the_reason(body, reason):
    with pytest.raises(UnreadablePayloadError, match=reason):
        parse_payload(body)


def test_topic_filters_match_including_shared_subscriptions():
    assert matches("shop/+/orders", "shop/eu/orders")
    assert matches("shop/#", "shop/eu/orders/1")
    assert not matches("shop/+/orders", "shop/eu/refunds")
    assert matches("$share/studiohook/shop/+/orders", "shop/eu/orders")
    assert not matches("$share/studiohook/shop/+/orders", "shop/eu/refunds")


def test_user_properties_become_lower_case_headers():
    class Props:
        UserProperty: ClassVar[list[tuple[str, str]]] = [
            ("X-Event-Id", "e1"),
            ("Content-Kind", "product"),
        ]

    assert user_properties(Props()) == {"x-event-id": "e1", "content-kind": "product"}  # type: ignore[arg-type]
    assert user_properties(None) == {}
