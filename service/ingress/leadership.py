"""One elected MQTT reader among the instances sharing a store; the others stand by.

Mosquitto 2.0 does not hand a dead shared-subscription member's unacknowledged messages to
the other members (see the README), so several instances do not split MQTT intake. They all
use the same client id, hence the same persistent broker session, and only the holder of the
store's exclusive lock `mqtt-reader:<client id>` connects with it. When the reader dies, the
next holder resumes that session and the broker redelivers what the dead reader had not
acknowledged (it acknowledged nothing it had not committed). A reader that cannot prove it
still holds the lock stops reading at once: a second connection with the same client id would
only take the session over from the first, back and forth. Even that overlap loses nothing:
every acknowledgement follows a commit, and the inbox dedupes a redelivered message.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol

import anyio
import anyio.abc

from service.ingress.base import started_once
from service.log import get_logger
from service.store.base import ExclusiveLock, StoreUnavailableError

log = get_logger("ingress.leadership")

Role = Literal["reader", "standby"]

ANSWER_CHECKS = 2
"""A lock query that takes longer than this many check intervals counts as failed."""
LAPSE_CHECKS = 5
"""After this many check intervals of silence the store frees a holder's lock (kill -9 frees
it at once). Longer than a check interval plus its answer time, so a cut-off reader has
stopped reading before another instance can be elected."""
RELEASE_GRACE_S = 2.0


class Locks(Protocol):
    """What the election needs from the store."""

    def exclusive_lock(self, name: str, *, lapse_s: float) -> ExclusiveLock:
        """The lock called `name`, shared by every process on the store."""


def reader_lock_name(client_id: str) -> str:
    """One reader per broker session: the lock is named after the session's client id."""
    return f"mqtt-reader:{client_id}"


class ReaderElection:
    """Runs `read` (the MQTT ingress) only while this instance holds the reader lock.

    A standing-by instance tries the lock every `check_s`; the reader proves it still holds it
    every `check_s` and is cancelled when it cannot. `role` is for /readyz.
    """

    def __init__(
        self,
        locks: Locks,
        *,
        client_id: str,
        read: Callable[..., Coroutine[Any, Any, None]],
        check_s: float = 1.0,
    ) -> None:
        self._lock = locks.exclusive_lock(
            reader_lock_name(client_id), lapse_s=LAPSE_CHECKS * check_s
        )
        self._client_id = client_id
        self._read = read
        self._check_s = check_s
        self._answer_s = ANSWER_CHECKS * check_s
        self.role: Role | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Forever: stand by until elected, read until the lock is lost; started once decided.

        Started means subscribed when elected, and standing by otherwise.
        """
        decided = started_once(task_status)

        try:
            while True:
                await self._stand_by(decided)
                await self._lead(decided)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_GRACE_S):
                await self._lock.release()

    async def _stand_by(self, decided: Callable[[], None]) -> None:
        """Return once the lock is ours; meanwhile try again every `check_s`."""
        while True:
            reason = "another instance is the reader"
            try:
                with anyio.fail_after(self._answer_s):
                    if await self._lock.try_acquire():
                        return
            except (StoreUnavailableError, TimeoutError) as exc:
                reason = f"store unavailable: {exc}" if str(exc) else "store did not answer"
                await self._release()
            self._become("standby", reason=reason)
            decided()
            await anyio.sleep(self._check_s)

    async def _lead(self, decided: Callable[[], None]) -> None:
        """Read until a check of the lock fails; then the reading is cancelled mid-flight."""
        self._become("reader", reason="lock taken")
        lost = "lock lost"
        async with anyio.create_task_group() as reading:

            async def watch() -> None:
                nonlocal lost
                lost = await self._until_lost()
                reading.cancel_scope.cancel()

            reading.start_soon(watch, name="mqtt-reader-lock")
            await reading.start(self._read, name="mqtt-reader")
            decided()
        self._become("standby", reason=lost)
        await self._release()

    async def _until_lost(self) -> str:
        """Check the lock every `check_s`; return why it is lost."""
        while True:
            await anyio.sleep(self._check_s)
            try:
                with anyio.fail_after(self._answer_s):
                    await self._lock.check()
            except TimeoutError:
                return f"lock check unanswered after {self._answer_s:g} s"
            except StoreUnavailableError as exc:
                return str(exc)

    async def _release(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_GRACE_S):
            await self._lock.release()

    def _become(self, role: Role, *, reason: str) -> None:
        if role == self.role:
            return
        self.role = role
        if role == "reader":
            log.info("mqtt.reader.elected", client_id=self._client_id)
        else:
            log.info("mqtt.reader.standby", client_id=self._client_id, reason=reason)
