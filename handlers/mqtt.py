"""MQTT messages: the topic is the event type, the JSON payload is read like plain JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.generic import handle_payload
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Normalise an MQTT message; routes match its topic with MQTT topic filters."""
    return handle_payload(event, event_type=event.topic)
