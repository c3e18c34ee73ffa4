"""lthreads: user-level threads on greenlets, and the one trap gateway to the host.

Theory of operation
-------------------
The enclave runs one OS thread.  Its root greenlet is the *hub*; every piece of
app code runs in an lthread (a child greenlet of the hub).  An lthread leaves
the CPU only by calling :meth:`Scheduler.park`, which switches to the hub; the
hub resumes it when something calls :meth:`Scheduler.wake`.

:meth:`Scheduler.host_call` is the only place an lthread parks on the host
(STYLE.md rule 1): it copies the request into a slot, publishes it and parks.
The hub runs every ready lthread, then drains the response ring in one batch,
copies each reply out once and wakes its lthread, fires due timers, and only
when nothing is ready waits (spin, then sleep on the doorbell).  So while one
lthread waits for ``recv``, the others keep running, and the host sees many
calls at once: SCONE's asynchronous system calls.

In *sync* mode ``host_call`` does not switch: the caller waits in place for its
own reply (one outstanding call), which models a synchronous enclave exit.

Timeouts are enclave-side timers: when one expires the hub sends ``CANCEL`` for
the parked slot and the caller still takes whatever reply comes back for it, so
an ``accept`` that completes in the same instant is never lost.

Scheduling is cooperative: a CPU-bound lthread delays the others (as in SCONE).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import greenlet

from pyscone.abi import Op
from pyscone.enclave import iago
from pyscone.enclave.syscalls import SyscallClient, Wakeup


class LThread:
    """One user-level thread."""

    __slots__ = ("__weakref__", "done", "glet", "ident", "name", "on_exit")

    def __init__(self, glet: greenlet.greenlet, ident: int, name: str) -> None:
        self.glet = glet
        self.ident = ident
        self.name = name
        self.on_exit: list[Callable[[], None]] = []
        self.done = False


class Timer:
    __slots__ = ("cancelled", "deadline", "fn")

    def __init__(self, deadline: float, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Call:
    """One call in flight: who waits for it, and the token its reply is filed under."""

    __slots__ = ("cancelled", "lt", "sid", "token")

    def __init__(self, token: int, lt: LThread | None) -> None:
        self.token = token
        self.lt = lt  # None: waited for in place, or started and not yet waited for
        self.sid = -1
        self.cancelled = False


class InFlight:
    """A host call started by :meth:`Scheduler.start`: what :meth:`Scheduler.finish` needs."""

    __slots__ = ("args", "call", "data", "op")

    def __init__(self, call: _Call, op: int, args: tuple[int, ...], data: bytes | memoryview) -> None:
        self.call = call
        self.op = op
        self.args = args
        self.data = data


class _Interrupt:
    """Delivered to a parked lthread instead of its value: raise ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Scheduler:
    def __init__(self, client: SyscallClient, *, sync: bool = False) -> None:
        self.client = client
        self.sync = sync
        self.hub = greenlet.getcurrent()
        self.ready: deque[tuple[LThread, Any]] = deque()
        self.current: LThread | None = None
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._idents = itertools.count(1)
        self._waiting: dict[int, _Call | None] = {}  # slot -> the call it carries (None: orphan)
        self._tokens = itertools.count(1)
        self._slot_waiters: deque[LThread] = deque()
        self._pending_cancels: list[tuple[int, _Call]] = []
        self._stopping = False
        self._interrupt: BaseException | None = None
        self._deferred: list[tuple[int, tuple[int, ...]]] = []
        self._replies: dict[int, tuple[int, int, bytes]] = {}  # call token -> reply
        self._signals: list[Callable[[], None]] = []
        self.main: LThread | None = None
        self.lthreads: dict[int, LThread] = {}

    # -- lthreads ---------------------------------------------------------------------

    def spawn(self, fn: Callable[..., object], args: tuple[Any, ...] = (), name: str | None = None) -> LThread:
        ident = next(self._idents)
        lt: LThread

        def body(*_first_switch_value: Any) -> None:
            try:
                fn(*args)
            except greenlet.GreenletExit:
                pass
            except BaseException:  # noqa: BLE001 - never let an lthread's death reach the hub
                _report_crash(lt)
            finally:
                lt.done = True
                self.lthreads.pop(ident, None)
                for cb in lt.on_exit:
                    cb()

        lt = LThread(greenlet.greenlet(body, parent=self.hub), ident, name or f"lthread-{ident}")
        self.lthreads[ident] = lt
        self.ready.append((lt, None))
        return lt

    def park(self) -> Any:
        """Give up the CPU until someone wakes this lthread; return what they passed."""
        value = self.hub.switch()
        if type(value) is _Interrupt:
            raise value.exc
        return value

    def wake(self, lt: LThread, value: Any = None) -> None:
        self.ready.append((lt, value))

    def yield_now(self) -> None:
        lt = self.current
        assert lt is not None, "the hub cannot yield"
        self.ready.append((lt, None))
        self.park()

    def others_waiting(self) -> bool:
        """Whether another lthread, a due timer or a signal waits for the CPU.

        An lthread that goes on without waiting for the host (the console shield writes
        behind the app) checks this to stay a fair turn and a safe point for ^C.
        """
        return bool(self.ready or self._signals or self._interrupt is not None or self._timer_due())

    def sleep(self, seconds: float) -> None:
        lt = self.current
        if lt is None:  # the hub never sleeps on behalf of an app
            raise RuntimeError("sleep outside an lthread")
        if seconds <= 0:
            self.yield_now()
            return
        deadline = time.monotonic() + seconds
        timer = self.call_later(seconds, lambda: self.wake(lt))
        try:
            while time.monotonic() < deadline:
                self.park()  # a spurious wake-up just parks again
        finally:
            timer.cancel()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        t = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (t.deadline, next(self._seq), t))
        return t

    def post(self, op: int, args: tuple[int, ...]) -> None:
        """Submit a call whose reply nobody waits for (it is dropped when it comes back)."""
        if self.client.free:
            sid = self.client.submit(op, 0, args, b"")
            self._waiting[sid] = None
        else:
            self._deferred.append((op, args))

    def defer(self, op: int, args: tuple[int, ...]) -> None:
        """Queue a fire-and-forget host call (e.g. a close from a finalizer, which must not switch)."""
        self._deferred.append((op, args))

    def _flush_deferred(self) -> None:
        while self._deferred and self.client.free:
            op, args = self._deferred.pop()
            sid = self.client.submit(op, 0, args, b"")
            self._waiting[sid] = None  # an orphan: its reply is dropped

    def request_interrupt(self, exc: BaseException) -> None:
        """From a signal handler: deliver ``exc`` to the main lthread at the next switch."""
        self._interrupt = exc
        self._kick()

    def queue_signal_handler(self, run: Callable[[], None]) -> None:
        """From the OS-level signal handler: run ``run`` in the hub at the next safe point."""
        self._signals.append(run)
        self._kick()

    def _kick(self) -> None:
        # ``sleeping`` is true only inside SyscallClient.wait's epoll try-block of the
        # greenlet we are running in, which catches Wakeup: cut that sleep short.
        if self.client.sleeping:
            self.client.sleeping = False
            raise Wakeup

    def _run_signal_handlers(self) -> None:
        while self._signals:
            run = self._signals.pop(0)
            try:
                run()
            except BaseException as e:  # noqa: BLE001 - CPython raises it in the main thread
                self._interrupt = e

    # -- the trap gateway ------------------------------------------------------------------

    def host_call(
        self,
        op: int,
        args: tuple[int, ...] = (),
        data: bytes | memoryview = b"",
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> tuple[int, int, Any]:
        """Run one system call on the host.  The only way an lthread waits for the host.

        Args:
            op: the opcode.
            args: up to six integer arguments.
            data: the request payload (at most one slot's data size).
            wait: the call is blocking from the app's view (the host parks it).
            timeout: seconds before the call is cancelled (``None``: never).

        Returns:
            ``(result, errno, value)`` with the value already validated by ``iago``;
            errno is ``ETIMEDOUT`` when the timeout cancelled the call.
        """
        client = self.client
        flags = 1 if wait else 0
        if self.sync or greenlet.getcurrent() is self.hub:
            result, err, payload = self._call_in_place(op, flags, args, data, timeout)
            return iago.validate(op, args, data, result, err, payload)
        lt = self.current
        assert lt is not None
        while not client.free:
            self._slot_waiters.append(lt)
            self.park()
        call = self._publish(op, flags, args, data, lt)
        return self._await(call, op, args, data, timeout)

    def host_call_in_place(
        self, op: int, args: tuple[int, ...] = (), data: bytes | memoryview = b""
    ) -> tuple[int, int, Any]:
        """:meth:`host_call` without letting any other lthread run until the reply is in."""
        result, err, payload = self._call_in_place(op, 0, args, data, None)
        return iago.validate(op, args, data, result, err, payload)

    def start(
        self, op: int, args: tuple[int, ...] = (), data: bytes | memoryview = b"", *, polled: bool = False
    ) -> InFlight | None:
        """Start a host call and return at once; :meth:`finish` takes its reply later.

        For work the caller can overlap with its own (read-ahead, write-behind, an FS-shield
        commit's syncs).  Returns ``None`` when the call cannot be started this way now: no
        slot is free, or the caller is the hub -- unless ``polled``: the hub may start one
        whose reply :meth:`poll` (which the hub can call) or an lthread's :meth:`finish` takes.
        In sync mode (a call from C, or ``--syscalls sync``) a call can be started too:
        :meth:`finish` then waits for it in place, without switching, as :meth:`host_call`
        does there.  A started call must be finished or :meth:`dropped <drop>`.
        """
        if not self.client.free or (greenlet.getcurrent() is self.hub and not polled):
            return None
        return InFlight(self._publish(op, 0, args, data, None), op, args, data)

    def finish(self, pending: InFlight) -> tuple[int, int, Any]:
        """Wait for a call made by :meth:`start`; the same result as :meth:`host_call`."""
        if self.sync:
            result, err, payload = self._wait_in_place(pending.call, None)
            return iago.validate(pending.op, pending.args, pending.data, result, err, payload)
        lt = self.current
        assert lt is not None, "the hub cannot wait for a started call"
        pending.call.lt = lt
        return self._await(pending.call, pending.op, pending.args, pending.data, None)

    def poll(self, pending: InFlight, *, wait: bool = False) -> tuple[int, int, Any] | None:
        """The reply of a call made by :meth:`start`, if it has come (``None`` if not yet).

        Never switches lthreads, so the hub (a timer) may ask too, where :meth:`finish`
        cannot; with ``wait`` it waits in place for the reply.  Once it returns a reply,
        the call is done (as after :meth:`finish`).
        """
        while True:
            self._drain()
            reply = self._replies.pop(pending.call.token, None)
            if reply is not None:
                result, err, payload = reply
                return iago.validate(pending.op, pending.args, pending.data, result, err, payload)
            if not wait:
                return None
            self.client.wait(self._next_timeout())

    def drop(self, pending: InFlight) -> None:
        """Give up a call made by :meth:`start`: its reply, now or later, is discarded."""
        call = pending.call
        self._replies.pop(call.token, None)
        if self._waiting.get(call.sid) is call:
            self._waiting[call.sid] = None  # an orphan: its reply is dropped

    def _publish(
        self, op: int, flags: int, args: tuple[int, ...], data: bytes | memoryview, lt: LThread | None
    ) -> _Call:
        # Register before publishing, and take only the reply filed under this call's own
        # token: a nested call (a finalizer flushing a file) cannot steal or lose it, and a
        # slot reused at once by another call cannot hand us its reply.
        call = _Call(next(self._tokens), lt)
        sid = self.client.prepare(op, flags, args, data)
        self._waiting[sid] = call
        call.sid = sid
        self.client.publish(sid)
        return call

    def _await(
        self, call: _Call, op: int, args: tuple[int, ...], data: bytes | memoryview, timeout: float | None
    ) -> tuple[int, int, Any]:
        client = self.client
        timer = None
        replies = self._replies
        try:
            if timeout is not None:
                timer = self.call_later(timeout, lambda: self._cancel(call.sid, call))
            while (reply := replies.pop(call.token, None)) is None:
                if self.ready or self._signals or self._interrupt is not None or self._timer_due():
                    self.park()  # someone else can run: the hub wakes us when our reply comes
                    continue
                # Direct wait: nothing else is runnable, so wait here rather than switch to
                # the hub and back.  Replies for other lthreads are still delivered, and the
                # moment one of them becomes ready we park and let it run.
                self._drain()
                if call.token not in replies and not self.ready:
                    client.wait(self._next_timeout())
        except BaseException:
            self._abandon(call.sid, call)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        result, err, payload = reply
        if call.cancelled and err == errno.ECANCELED:
            return -1, errno.ETIMEDOUT, None
        return iago.validate(op, args, data, result, err, payload)

    def _call_in_place(
        self, op: int, flags: int, args: tuple[int, ...], data: bytes | memoryview, timeout: float | None
    ) -> tuple[int, int, bytes]:
        """Wait for one call without switching (the hub, or any lthread in sync mode)."""
        client = self.client
        while not client.free:
            self._drain()
            client.wait(None)
        call = _Call(next(self._tokens), None)
        sid = client.prepare(op, flags, args, data)
        self._waiting[sid] = call
        call.sid = sid
        try:
            client.publish(sid)
        except BaseException:
            self._abandon(sid, call)
            raise
        return self._wait_in_place(call, timeout)

    def _wait_in_place(self, call: _Call, timeout: float | None) -> tuple[int, int, bytes]:
        """Wait without switching for ``call``'s reply (published already)."""
        client = self.client
        sid = call.sid
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                self._drain()  # delivers every reply of the batch; ours lands in _replies
                mine = self._replies.pop(call.token, None)
                if mine is not None:
                    if call.cancelled and mine[1] == errno.ECANCELED:
                        return -1, errno.ETIMEDOUT, b""
                    return mine
                if self._signals:
                    self._run_signal_handlers()
                if self._interrupt is not None and self.main is not None and greenlet.getcurrent() is self.main.glet:
                    exc, self._interrupt = self._interrupt, None
                    raise exc  # ^C while the main lthread waits in place (sync mode)
                remaining = None
                if deadline is not None and not call.cancelled:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._cancel(sid, call)
                        remaining = None
                client.wait(remaining)
        except BaseException:
            self._abandon(sid, call)
            raise

    def _abandon(self, sid: int, call: _Call) -> None:
        """The caller gave up (an exception): drop the reply, now or when it comes."""
        self._replies.pop(call.token, None)
        if self._waiting.get(sid) is call:
            self._cancel(sid, call)
            self._waiting[sid] = None  # an orphan: its reply is dropped

    def _cancel(self, sid: int, call: _Call) -> None:
        """Ask the host to abandon ``call`` (which holds slot ``sid``), if it is still pending."""
        if self._waiting.get(sid) is not call or call.cancelled:
            return  # answered already (the slot may even belong to another call by now)
        call.cancelled = True
        if self.client.free:
            self._send_cancel(sid)
        else:
            self._pending_cancels.append((sid, call))

    def _send_cancel(self, target: int) -> None:
        sid = self.client.submit(Op.CANCEL, 0, (target,), b"")
        self._waiting[sid] = None  # an orphan: its reply is dropped

    # -- the hub --------------------------------------------------------------------------

    def _dispatch_reply(self, sid: int, reply: tuple[int, int, bytes]) -> None:
        call = self._waiting.pop(sid, None)
        if call is not None:
            self._replies[call.token] = reply
            lt = call.lt
            if lt is not None and (lt is not self.current or greenlet.getcurrent() is self.hub):
                self.ready.append((lt, None))  # (a direct or in-place waiter finds it itself)
        if self._slot_waiters:
            self.ready.append((self._slot_waiters.popleft(), None))

    def _drain(self) -> None:
        client = self.client
        for sid in client.collect():
            self._dispatch_reply(sid, client.read_reply(sid))
        if self._deferred:
            self._flush_deferred()
        if self._pending_cancels and client.free:
            pending, self._pending_cancels = self._pending_cancels, []
            for sid, call in pending:
                if self._waiting.get(sid) is call or self._waiting.get(sid, call) is None:
                    self._send_cancel(sid)

    def _timer_due(self) -> bool:
        return bool(self._timers) and self._timers[0][0] <= time.monotonic()

    def _next_timeout(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] - time.monotonic() if timers else None

    def _fire_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                t.fn()

    def run(self, main: Callable[[], object]) -> None:
        """Run ``main`` as the main lthread; return when it has finished."""

        def main_body() -> None:
            try:
                main()
            finally:
                self._stopping = True

        self.main = self.spawn(main_body, name="MainThread")
        ready = self.ready
        while True:
            while ready:
                lt, value = ready.popleft()
                if lt.done:
                    continue
                self.current = lt
                try:
                    lt.glet.switch(value)
                finally:
                    self.current = None
                if self._deferred:
                    self._flush_deferred()
                if self._stopping:
                    return
                if self._signals or self._interrupt is not None or self._timer_due():
                    break  # lthreads that never wait (yield_now) must not starve timers and signals
            if self._signals:
                self._run_signal_handlers()
            if self._interrupt is not None and self.main is not None:
                exc, self._interrupt = self._interrupt, None
                self._deliver(self.main, exc)
                continue
            if self.client.outstanding:  # (self.client: a forked child changes it under this loop)
                self._drain()
            if self._timers:
                self._fire_timers()
            if ready:
                continue
            self.client.wait(self._next_timeout())

    def settle(self) -> None:
        """Wait in place until no fire-and-forget or :meth:`started <start>` call is queued or in
        flight (before a fork).  A close the host has not done yet would leave the child's host
        a descriptor too many; a started call (a read-ahead, a write-behind) is then answered in
        the memory the child inherits, so that either process can :meth:`finish` it.  (Calls that
        lthreads wait for may wait forever, an ``accept``: they stay the parent's.)"""
        while self._unsettled():
            self._drain()
            if self._unsettled():
                self.client.wait(None)

    def _unsettled(self) -> bool:
        return bool(self._deferred) or any(call is None or call.lt is None for call in self._waiting.values())

    def after_fork_child(self, client: SyscallClient) -> list[LThread]:
        """In a forked child: run on ``client`` (the child's lane) with only the forking lthread.

        The other lthreads do not exist in the child, as other threads do not after fork(2);
        what they waited for belongs to the parent.  They are returned, to be kept referenced:
        a collected greenlet would be unwound (GreenletExit), running its ``finally`` blocks.
        """
        me = self.current
        gone = [lt for lt in self.lthreads.values() if lt is not me]
        self.client = client
        self.ready.clear()
        self._timers.clear()
        self._waiting.clear()
        self._slot_waiters.clear()
        self._pending_cancels.clear()
        self._deferred.clear()
        self._signals.clear()  # (the replies stay: those of started calls are the child's to finish too)
        self._interrupt = None
        self.lthreads = {} if me is None else {me.ident: me}
        if me is not None and me is not self.main:
            # The forking thread is the child's main thread (as after fork(2)): when it ends, so does the child.
            self.main = me
            me.on_exit.append(self._stop_after_fork)
        return gone

    def _stop_after_fork(self) -> None:
        self._stopping = True

    def _deliver(self, lt: LThread, exc: BaseException) -> None:
        """Interrupt ``lt`` wherever it is parked (host call, sleep) with ``exc``."""
        for sid, call in list(self._waiting.items()):
            if call is not None and call.lt is lt:
                self._abandon(sid, call)
                break
        # Queued behind anything already handed to it (a lock, a reply), never instead.
        self.ready.append((lt, _Interrupt(exc)))


def dump_lthreads(sched: Scheduler) -> str:
    """Every lthread's stack, for debugging a hung enclave (``kill -USR2 <enclave pid>``)."""
    import traceback

    out = [
        f"pyscone: {len(sched.lthreads)} lthreads, {len(sched.client.outstanding)} host calls outstanding, "
        f"{len(sched.ready)} ready, {len(sched._waiting)} slots in flight, {len(sched._replies)} replies unclaimed, "
        f"{len(sched._signals)} signals queued, {len(sched._timers)} timers, interrupt {sched._interrupt!r}, "
        f"pending cancels {len(sched._pending_cancels)}"
    ]
    for lt in list(sched.lthreads.values()):
        out.append(f"--- lthread {lt.ident} {lt.name}")
        frame = lt.glet.gr_frame
        out.extend(line.rstrip() for line in traceback.format_stack(frame) if frame is not None)
    return "\n".join(out) + "\n"


def _report_crash(lt: LThread) -> None:
    """An exception escaped an lthread's top level: report it as the interpreter would."""

    from pyscone.enclave import redact

    try:
        redact.print_exc(header=f"Exception in lthread {lt.name}:\n")
    except BaseException:  # noqa: BLE001 - the console itself may be what failed
        pass


_scheduler: Scheduler | None = None


def install(s: Scheduler) -> None:
    global _scheduler
    _scheduler = s


def get() -> Scheduler:
    assert _scheduler is not None, "the enclave scheduler is not running"
    return _scheduler
