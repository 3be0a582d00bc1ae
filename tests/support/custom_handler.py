"""A user's own handler, as a route's `handler = "tests.support.custom_handler:handle"`."""

from service.model import HandledEvent, RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Reads a vendor shape the built-in handlers do not know (`item.label`)."""
    label = event.payload["item"]["label"]
    return HandledEvent(
        event_id=None, event_type="item.created", context={"product": {"title": f"Custom {label}"}}
    )
