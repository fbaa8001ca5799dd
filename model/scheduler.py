"""The engine's scheduler: the waiting queue, the decode slots and admission (first in, first out).

Callers (any thread) add requests and flag aborts under `lock`; the loop thread admits, frees slots and drains. Slots
are taken lowest first, so the active slots stay a short prefix [0, n) and a decode step covers few free rows.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable

from .requests import Seq


class Scheduler:
    def __init__(self, slots: int, max_prefill_batch: int):
        self.slots: list[Seq | None] = [None] * slots
        self.waiting: collections.deque[Seq] = collections.deque()
        self.max_prefill_batch = max_prefill_batch
        self.lock = threading.Lock()  # guards `waiting` and abort flags between callers and the loop thread
        self.wake = threading.Condition(self.lock)

    def add(self, seqs: list[Seq]) -> None:
        with self.lock:
            self.waiting.extend(seqs)
            self.wake.notify()

    def running(self) -> list[Seq]:
        return [s for s in self.slots if s is not None]

    def busy(self) -> bool:
        """Anything waiting or running (call under `lock` from the loop's idle wait)."""
        return bool(self.waiting) or any(self.slots)

    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s is None)

    def upcoming(self) -> list[Seq]:
        """The waiting requests that would get the free slots next (at most one prefill batch)."""
        with self.lock:
            return list(itertools.islice(self.waiting, min(self.free_slots(), self.max_prefill_batch)))

    def waiting_now(self) -> list[Seq]:
        with self.lock:
            return list(self.waiting)

    def admit(self, ready: Callable[[Seq], bool] | None = None) -> list[Seq]:
        """Move waiting requests into free slots, at most `max_prefill_batch`; with `ready`, stop at the first
        request that is not (its pages are still being encoded: first in, first out)."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        admitted = []
        with self.lock:
            while free and self.waiting and len(admitted) < self.max_prefill_batch:
                if ready is not None and not ready(self.waiting[0]):
                    break
                seq = self.waiting.popleft()
                seq.slot = free.pop(0)  # lowest free slot first: keeps the active prefix short
                self.slots[seq.slot] = seq
                admitted.append(seq)
        now = time.perf_counter()
        for seq in admitted:
            seq.timings.queue_s = now - seq.request.arrival
        return admitted

    def release(self, seq: Seq) -> None:
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None

    def take_aborted(self) -> list[Seq]:
        """Aborted requests, waiting ones removed from the queue (running ones keep their slot until finished)."""
        with self.lock:
            waiting = [s for s in self.waiting if s.aborted]
            if waiting:  # rebuilt, not `remove`d: that would look requests up by equality (tensors inside)
                kept = [s for s in self.waiting if not s.aborted]
                self.waiting.clear()
                self.waiting.extend(kept)
        return waiting + [s for s in self.slots if s is not None and s.aborted]

    def abort(self, request_id: str) -> None:
        with self.lock:
            for seq in itertools.chain(self.waiting, (s for s in self.slots if s)):
                if seq.request.request_id == request_id:
                    seq.aborted = True

    def drain(self) -> list[Seq]:
        """Every request waiting or running (the queue is emptied; slots are freed as each is finished)."""
        with self.lock:
            seqs = list(self.waiting) + [s for s in self.slots if s]
            self.waiting.clear()
        return seqs
