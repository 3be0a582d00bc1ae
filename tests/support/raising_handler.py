"""A user's handler that fails in every way user code can: `raise` in the payload picks how."""

from __future__ import annotations

from service.model import HandledEvent, RawEvent


class UnprintableError(Exception):
    """An exception whose message itself raises, as badly written user code produces."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


FAILURES: dict[str, type[BaseException]] = {
    "KeyError": KeyError,
    "TypeError": TypeError,
    "ZeroDivisionError": ZeroDivisionError,
    "RecursionError": RecursionError,
    "UnicodeDecodeError": ValueError,
    "Unprintable": UnprintableError,
    "AssertionError": AssertionError,
}


def handle(event: RawEvent) -> HandledEvent:
    """Raise what the payload asks for; return a wrong type when it asks for that."""
    payload = event.payload
    how = payload.get("raise") if isinstance(payload, dict) else None
    if how == "wrong-type":
        return "not a HandledEvent"  # type: ignore[return-value]
    if how == "int-id":
        return HandledEvent(event_id=5, event_type=None, context={})  # type: ignore[arg-type]
    if isinstance(how, str) and how in FAILURES:
        raise FAILURES[how](f"user handler failed on purpose: {how}")
    title = payload.get("title") if isinstance(payload, dict) else None
    return HandledEvent(event_id=None, event_type="item", context={"product": {"title": title}})
