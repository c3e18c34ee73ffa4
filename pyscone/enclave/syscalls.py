"""The enclave's system-call client: slots, the request ring, the response ring.

The client is the single producer of requests and the single consumer of
responses.  It owns the free-slot list and the set of outstanding slots, so it
can check everything the host says about the rings themselves: a response
counter that runs ahead of what could be outstanding, a slot id out of range,
a slot that was never submitted or is answered twice.  (What a reply *says* is
checked afterwards by ``iago.validate``.)

Waiting is spin-then-sleep: spin on the response counter for an adaptive,
bounded time, then set the "enclave sleeping" flag, re-check, and block in
``epoll_wait`` on the doorbell.  The host rings only when the flag is set, so a
busy enclave costs the host no doorbell syscalls.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque

from pyscone import abi, rings
from pyscone.enclave.iago import HostViolation, fail_stop

#: Upper bound on one sleep: a doorbell lost to store reordering costs at most this.
WATCHDOG_S = 0.05


class Wakeup(Exception):
    """Raised by the signal handler to cut an idle epoll_wait short."""


class SyscallClient:
    def __init__(
        self,
        region: rings.SharedRegion,
        doorbell_host: int,
        doorbell_enclave: int,
        spin_us: int,
        ep: select.epoll | None = None,
    ) -> None:
        """Start at the rings' current counters.  ``ep``: an epoll set made earlier that holds
        the enclave's doorbell (a forked child's lane: after lockdown none can be made)."""
        self.region = region
        self.mm = region.mm
        self.geometry = g = region.geometry
        self.requests = rings.request_producer(region)
        self.responses = rings.response_consumer(region)
        self.doorbell_host = doorbell_host
        self.doorbell_enclave = doorbell_enclave
        # FIFO, so consecutive calls use different slots: a replayed answer then names a
        # slot that is not outstanding and is caught here, not mistaken for a fresh one.
        self.free: deque[int] = deque(range(g.nslots))
        self.outstanding: set[int] = set()
        self.slot_data = g.slot_data
        self._slot_off = [g.slot_off(i) for i in range(g.nslots)]
        if ep is None:
            ep = select.epoll()
            ep.register(doorbell_enclave, select.EPOLLIN)
        self.ep = ep
        self.spin_max = spin_us / 1e6
        self.spin = self.spin_max
        self.calls = 0
        self.doorbells = 0
        self.sleeps = 0
        self.watchdog_wakeups = 0
        #: True only while blocked in epoll_wait: the one place a signal may interrupt.
        self.sleeping = False

    def submit(self, op: int, flags: int, args: tuple[int, ...], data: bytes | memoryview) -> int:
        """Copy a request into a free slot and publish it.  The caller ensured a slot is free."""
        sid = self.prepare(op, flags, args, data)
        self.publish(sid)
        return sid

    def prepare(self, op: int, flags: int, args: tuple[int, ...], data: bytes | memoryview) -> int:
        """Copy a request into a free slot without publishing it yet."""
        sid = self.free.popleft()
        off = self._slot_off[sid]
        n = len(data)
        a = args + (0,) * (6 - len(args))
        abi.REQ.pack_into(self.mm, off, op, flags, a[0], a[1], a[2], a[3], a[4], a[5], n)
        if n:
            self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + n] = data
        return sid

    def publish(self, sid: int) -> None:
        """Hand a prepared slot to the host."""
        self.outstanding.add(sid)
        self.requests.push(sid)
        self.calls += 1
        if self.region.flag(abi.OFF_HOST_SLEEPING):
            self.doorbells += 1
            os.eventfd_write(self.doorbell_host, 1)

    def collect(self) -> list[int]:
        """Take every answered slot id from the response ring, checking the ring itself."""
        resp = self.responses
        tail = resp.peek_tail()
        if tail == resp.head:
            return []
        if not 0 < tail - resp.head <= len(self.outstanding):
            fail_stop(f"response ring claims {tail - resp.head} answers with {len(self.outstanding)} outstanding")
        sids = resp.take(tail)
        outstanding = self.outstanding
        for sid in sids:
            if sid not in outstanding:
                what = "out of range" if sid >= self.geometry.nslots else "not outstanding (forged or duplicated)"
                fail_stop(f"response names slot {sid}, which is {what}")
            outstanding.remove(sid)
        return sids

    def read_reply(self, sid: int) -> tuple[int, int, bytes]:
        """Copy a reply out of its slot exactly once, and free the slot."""
        off = self._slot_off[sid]
        result, err, n = abi.RESP.unpack_from(self.mm, off + abi.RESP_OFF)
        if n > self.slot_data:
            fail_stop(f"reply of {n} bytes exceeds the slot size {self.slot_data}")
        data = self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + n] if n else b""
        self.free.append(sid)
        return result, err, data

    def wait(self, timeout: float | None) -> None:
        """Block until the response ring may have something, or ``timeout`` passes.

        Spin first, for an adaptive time: after a wait that ended within twice the
        spin budget (a spin would have caught it) spin the full budget next time;
        after a longer one (the host was blocked, not slow) halve it.
        """
        resp = self.responses
        start = time.perf_counter()
        hint = self.region.flag(abi.OFF_SPIN_HINT)  # the host's advice (only speed depends on it)
        spin_until = start + (self.spin if not hint else min(self.spin, (hint - 1) / 1e6))
        while time.perf_counter() < spin_until:
            if resp.pending():
                return
            os.sched_yield()  # spin politely: on 2 cores the host may need this one
        region = self.region
        region.set_flag(abi.OFF_ENCLAVE_SLEEPING, 1)
        if resp.pending():
            region.set_flag(abi.OFF_ENCLAVE_SLEEPING, 0)
            return
        self.sleeps += 1
        wait = WATCHDOG_S if timeout is None else min(max(timeout, 0.0), WATCHDOG_S)
        events = []
        try:
            self.sleeping = True  # inside the try: a signal may land on any bytecode from here
            events = self.ep.poll(wait)
            self.sleeping = False
        except Wakeup:  # a signal arrived: let the scheduler run its handler now
            self.sleeping = False
        region.set_flag(abi.OFF_ENCLAVE_SLEEPING, 0)
        if events:
            try:
                os.eventfd_read(self.doorbell_enclave)
            except BlockingIOError:
                pass
        elif resp.pending():
            self.watchdog_wakeups += 1
        if time.perf_counter() - start < 2 * self.spin_max:
            self.spin = self.spin_max
        else:
            self.spin = max(self.spin / 2, self.spin_max / 16)


__all__ = ["WATCHDOG_S", "HostViolation", "SyscallClient", "Wakeup"]
