"""Per-request deadlines with one shared timer.

``asyncio.timeout`` schedules (and on exit cancels) a loop timer per use, which costs about as much
as the rest of a webhook request's own work under uvloop. Deliveries only need their deadline kept to
a few tens of milliseconds, so one periodic sweep cancels the tasks that ran past theirs.
"""

from __future__ import annotations

import asyncio

RESOLUTION_SECONDS = 0.025


class Deadlines:
    """Cancel tasks that run past their deadline; ``expired`` tells that cancellation from any other."""

    def __init__(self, resolution: float = RESOLUTION_SECONDS) -> None:
        self._resolution = resolution
        self._deadlines: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def set(self, task: asyncio.Task[object], seconds: float) -> None:
        """(Re)arm ``task`` to be cancelled ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + seconds
        if self._timer is None:
            self._timer = loop.call_later(self._resolution, self._sweep)

    def clear(self, task: asyncio.Task[object]) -> bool:
        """Disarm ``task``; True when it was cancelled for running past its deadline."""
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                if not task.done():
                    self._expired.add(task)
                    task.cancel()
        self._timer = loop.call_later(self._resolution, self._sweep) if self._deadlines else None
