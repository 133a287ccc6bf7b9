"""Bounds on the generation requests in flight, checked before any work is done for one.

    ticket = admission.enter(len(request_bytes))   # or ResourceExhausted naming the limit
    try: ... parse, submit, stream ...
    finally: ticket.release()

Both adapters (gRPC Generate and the HTTP API) take a ticket when a request arrives and give it
back when its response ends, however it ends: at most `max_requests` requests, and at most
`max_bytes` bytes of their encoded requests together, are in the router at once. A request over
either bound is refused at once with RESOURCE_EXHAUSTED (HTTP 429), before it is parsed.
Pure bookkeeping on the event loop: no locks, no I/O.

`refuse_if_queue_full` is the queue's bound seen from the same place: a request that the
scheduler's waiting queue (`--max-waiting`) would refuse anyway is refused before it is read,
parsed or validated, so that a burst's excess costs the router next to nothing (issue 16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.errors import ResourceExhausted

if TYPE_CHECKING:
    from router_svc.scheduler import Scheduler


def refuse_if_queue_full(scheduler: Scheduler | None) -> None:
    """ResourceExhausted when the waiting queue has no room for one more request (the rule of
    `Scheduler.reserve_waiting`, which still takes the slot once the request is parsed; a
    router not yet serving has no scheduler and answers later, UNAVAILABLE)."""
    if scheduler is not None and (scheduler.num_waiting + scheduler.num_reserved_waiting
                                  >= scheduler.config.max_waiting):
        raise ResourceExhausted(f"waiting queue full ({scheduler.config.max_waiting} requests)")


class Admission:
    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0  # in flight now
        self.bytes = 0  # their encoded sizes, together
        self.refused = 0  # since start

    def enter(self, nbytes: int) -> Ticket:
        """A ticket for one request of `nbytes` encoded bytes, or ResourceExhausted."""
        if self.requests >= self.max_requests:
            self.refused += 1
            raise ResourceExhausted(
                f"too many requests in flight: {self.requests}, the limit is "
                f"{self.max_requests} (--max-inflight-requests)")
        self._check_bytes(nbytes)
        self.requests += 1
        self.bytes += nbytes
        return Ticket(self, nbytes)

    def _check_bytes(self, nbytes: int) -> None:
        if self.bytes + nbytes > self.max_bytes:
            self.refused += 1
            raise ResourceExhausted(
                f"too many request bytes in flight: {self.bytes} + this request's {nbytes} "
                f"exceeds the limit of {self.max_bytes} (--max-inflight-bytes)")


class Ticket:
    """One request's share of the bounds; `release` is idempotent."""

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self._admission, self.nbytes = admission, nbytes
        self._released = False

    def grow(self, nbytes: int) -> None:
        """Count `nbytes` more (a body whose size was not known when it arrived), or
        ResourceExhausted (the ticket stays as it was: release it)."""
        self._admission._check_bytes(nbytes)
        self._admission.bytes += nbytes
        self.nbytes += nbytes

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.requests -= 1
            self._admission.bytes -= self.nbytes
