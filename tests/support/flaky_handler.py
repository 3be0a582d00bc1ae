"""A user's own handler with a bug the operator fixes: the console test replays what it broke.

`broken` stands for the bug: while it is set the handler raises, so intake dead-letters the
event; the test clears it (the fix) and presses Replay.
"""

from service.model import HandledEvent, RawEvent

broken = True


def handle(event: RawEvent) -> HandledEvent:
    """Reads `{"title", "image_url"}`, or fails like a handler with a bug."""
    if broken:
        raise RuntimeError("cms handler bug: entry.title is read from the wrong key")
    payload = event.payload
    product = {"title": payload["title"], "image_url": payload["image_url"]}
    return HandledEvent(event_id=None, event_type="entry.publish", context={"product": product})
