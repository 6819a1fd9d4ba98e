"""Keep the local stack up: a service that exits is started again, as compose or Kubernetes would.

Why here and not in each service: `make run` is one foreground command with no
container runtime; one crashed worker (or API, Redis, S3, Flower) must not
take the others down, nor leave the stack half up until someone notices.

A restart is exactly a start: LocalStack.start_again() repeats the service's
own start_* call, with the same name, ports, queues and env. A restarted GPU
worker therefore serves the same queue on the same metrics port, and the job
the dead one held is sent on by the reaper (docs/operations.md, "Failures").

Restarts wait 1 s, then 2, 4, ... up to 30 s; a service that then stays up
60 s starts over at 1 s. Five exits within a minute is a crash loop: it is
reported loudly, with the end of the service's log, and retried every 30 s
until the stack stops. Restarts run on threads, so a worker loading its model
never delays the restart of another service.
"""
from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:    # no import at run time: dev.localstack imports this module
    from dev.localstack import LocalStack, Service


@dataclass(frozen=True)
class Backoff:
    """When to restart: `first` seconds, times `factor` after each exit, at most `longest`."""

    first: float = 1.0
    factor: float = 2.0
    longest: float = 30.0
    stable_after: float = 60.0      # up this long: the next exit starts over at `first`
    loop_exits: int = 5             # this many exits within `loop_window` seconds: a crash loop
    loop_window: float = 60.0


@dataclass
class Watched:
    """What the supervisor knows of one service."""

    name: str
    up_since: float
    delay: float                                  # the wait before the next restart
    exits: collections.deque = field(default_factory=collections.deque)   # recent exit times
    due: float | None = None                      # when the scheduled restart runs
    starting: Future | None = None                # a restart in progress
    restarts: int = 0
    looping: bool = False                         # in a crash loop (until it stays up `stable_after`)
    before: Service | None = None                 # the service a restart replaces


def describe_exit(code: int | None) -> str:
    """"exit code 3", "exit code -9, SIGKILL" (Popen's negative code: killed by that signal)."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"exit code {code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}" + (f", {KNOWN_EXITS[code]}" if code in KNOWN_EXITS else "")


KNOWN_EXITS = {75: "a worker's watchdog ended a hung job (worker/watchdog.py)"}


def log_tail(path: Path | None, lines: int = 15, window: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of a log (read from its last `window` bytes: logs only grow)."""
    if path is None:
        return []
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, 2) - window))
            return log.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class Supervisor:
    """Watches the stack's services; restarts any that exits, with backoff; stop() ends it all."""

    def __init__(self, stack: LocalStack, backoff: Backoff = Backoff(), out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, poll: float = 0.5):
        self.stack = stack
        self.backoff = backoff
        self.out = out
        self.clock = clock
        self.poll = poll
        self.watched: dict[str, Watched] = {}
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="restart")

    def say(self, message: str) -> None:
        out = self.out or sys.stdout
        stamp = time.strftime("%H:%M:%S")
        for line in message.splitlines():
            print(f"{stamp} supervisor: {line}", file=out)
        out.flush()

    def watch(self) -> None:
        """Until stop(): notice exits, restart when due (the caller's thread; Ctrl-C interrupts it)."""
        while not self.stopping.is_set():
            self.check()
            self.stopping.wait(self.poll)

    def check(self) -> None:
        """One pass: adopt new services, record exits, finish and start restarts."""
        now = self.clock()
        for name in list(self.stack.starts):
            if name not in self.watched:
                self.watched[name] = Watched(name, now, self.backoff.first)
        for w in self.watched.values():
            if self.stopping.is_set():
                return
            if w.starting is not None:
                if w.starting.done():
                    self.started(w)
            elif w.due is None:
                svc = self.stack.services.get(w.name)
                if svc is None or not svc.alive():
                    self.exited(w, svc)
            elif now >= w.due:
                self.restart(w.name)

    def exited(self, w: Watched, svc: Service | None, error: str | None = None) -> None:
        """Record an exit (or a failed restart), clear what is left of it, schedule the restart."""
        b = self.backoff
        code = svc.proc.poll() if svc is not None and svc.proc is not None else None
        if svc is not None:
            svc.kill_leftovers()
        now = self.clock()
        if w.starting is None and now - w.up_since >= b.stable_after:   # it had been up long enough
            w.delay, w.looping = b.first, False
            w.exits.clear()
        w.exits.append(now)
        while w.exits and now - w.exits[0] > b.loop_window:
            w.exits.popleft()
        entering_loop = not w.looping and len(w.exits) >= b.loop_exits
        w.looping = w.looping or entering_loop
        wait = b.longest if w.looping else w.delay
        w.delay = min(w.delay * b.factor, b.longest)
        w.due = now + wait
        log = svc.log if svc is not None else self.stack.data_dir / "logs" / f"{w.name}.log"
        if error is None:
            what = f"{w.name} exited ({describe_exit(code)})"
        elif svc is not None:
            what = f"{w.name} failed to start ({describe_exit(code)}: {error})"
        else:
            what = f"{w.name} failed to start ({error})"
        still = " (still crash-looping: the cause is in the log)" if w.looping and not entering_loop else ""
        self.say(f"{what}; restarting in {wait:g} s; log: {log}{still}")
        if entering_loop:
            self.alarm(w, log)

    def alarm(self, w: Watched, log: Path) -> None:
        """Say loudly that a service keeps crashing, and where to look."""
        b = self.backoff
        bar = "!" * 78
        tail = "\n".join("  | " + line for line in log_tail(log)) or "  | (the log is empty)"
        self.say(f"{bar}\n{w.name} KEEPS CRASHING: {len(w.exits)} exits within {b.loop_window:g} s.\n"
                 f"It is retried every {b.longest:g} s until it stays up or the stack stops;\n"
                 f"the cause is in its log, {log}. Its last lines:\n{tail}\n{bar}")

    def restart(self, name: str) -> Future:
        """Start `name` again, on a thread, exactly as it was first started (LocalStack.start_again)."""
        w = self.watched[name]
        w.due, w.before = None, self.stack.services.get(name)
        w.restarts += 1
        self.say(f"restarting {name} (restart {w.restarts})")
        w.starting = self.pool.submit(self.stack.start_again, name)
        return w.starting

    def started(self, w: Watched) -> None:
        """A restart ended: the service is up, or its start failed (counted as an exit)."""
        error = w.starting.exception()
        svc = self.stack.services.get(w.name)
        if svc is w.before:      # it failed before its process started (a port taken, ...)
            svc = None
        if error is None and svc is not None and svc.alive():
            w.starting, w.up_since = None, self.clock()
            self.say(f"{w.name} is up again (pid {svc.proc.pid})")
            return
        if svc is not None and svc.alive():     # started but never ready: kill it before trying again
            svc.signal(signal.SIGKILL)
            svc.proc.wait(5)
        self.exited(w, svc, error=str(error).splitlines()[0] if error is not None else "it exited at once")
        w.starting = None

    def stop(self) -> None:
        """Stop watching and restarting, then stop every service (LocalStack.stop: workers finish their job)."""
        self.stopping.set()
        self.stack.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)   # a start under way ends with its process
