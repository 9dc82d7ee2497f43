"""The event-loop watchdog: notices when the loop stops turning, and names the node that held it.

Everything in a FlowChat process shares one event loop: a node (or a template) that blocks
it — CPU-bound work, a blocking call — stops ingress, lease renewal and every other execution.
A loop task beats every ``interval``; a thread checks the beat, and when the loop has not
turned for ``threshold`` seconds it logs the stall with the node running at that moment
(read from the loop thread's stack) and counts it in ``/metrics``
(``flowchat_event_loop_stalls_total``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from types import FrameType

from flowchat.metrics import Metrics

log = logging.getLogger("flowchat.watchdog")
_RUNNER_STEPS = frozenset({"_attempt", "_run_node", "_execute"})


class LoopWatchdog:
    """Run :meth:`run` as a task of the loop to watch; it stops watching when cancelled."""

    def __init__(self, metrics: Metrics, threshold: float = 1.0, interval: float = 0.1) -> None:
        self.metrics = metrics
        self.threshold = threshold
        self.interval = interval
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._loop_thread = 0

    async def run(self) -> None:
        """Beat until cancelled, with the watching thread alongside."""
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        watcher = threading.Thread(target=self._watch, name="flowchat-loop-watchdog", daemon=True)
        watcher.start()
        try:
            while True:
                self._beat = time.monotonic()
                await asyncio.sleep(self.interval)
        finally:
            self._stop.set()

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(self.interval):
            beat = self._beat
            late = time.monotonic() - beat
            if late > self.threshold and stalled_since != beat:
                stalled_since = beat
                self.metrics.loop_stalled()
                log.warning("event loop stalled for %.1fs so far, held by %s", late, self._holder())
            elif late <= self.threshold and stalled_since is not None:
                log.warning("event loop turning again after a stall of %.1fs", self._beat - stalled_since)
                stalled_since = None

    def _holder(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        return describe_holder(frame)


def describe_holder(frame: FrameType | None) -> str:
    """``execution <id> node <id> (<type>)`` if a runner step is on the stack, else the innermost function."""
    innermost = frame
    while frame is not None:
        if frame.f_code.co_name in _RUNNER_STEPS and frame.f_globals.get("__name__") == "flowchat.runner":
            node = frame.f_locals.get("node")
            execution = frame.f_locals.get("execution")
            ctx = frame.f_locals.get("ctx")
            execution_id = getattr(execution, "id", None) or getattr(ctx, "execution_id", "?")
            if node is not None:
                return f"execution {execution_id} node {getattr(node, 'id', '?')} ({getattr(node, 'type', '?')})"
        frame = frame.f_back
    if innermost is None:
        return "an unknown caller"
    return f"{innermost.f_code.co_name} ({innermost.f_code.co_filename}:{innermost.f_lineno})"
