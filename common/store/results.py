"""Small typed results of the store's transitions (as cog's `Done(canceled, error)`), never bare strings.

Why: a caller branching on `'wait'`, `'empty'` or a `-2` sentinel breaks
silently when a script changes; an enum or dataclass is checked where used.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Claim:
    """One job a worker holds: attempt `attempt` of `task_id`."""

    task_id: str
    attempt: int


@dataclass(frozen=True)
class Picked:
    """The job a worker took: run attempt `attempt` of `task_id` on `model`, with `companions` in one call."""

    task_id: str
    attempt: int
    model: str
    companions: tuple[Claim, ...] = ()

    @property
    def claims(self) -> list[Claim]:
        """Every job taken, the picked one first."""
        return [Claim(self.task_id, self.attempt), *self.companions]


class NoPick(str, Enum):
    """Why a delivery took no job."""

    EMPTY = "empty"   # nothing waits, or other deliveries are queued for what waits: this one is surplus
    WAIT = "wait"     # only jobs for models other live workers hold, not waited long enough yet


class CancelOutcome(str, Enum):
    """What a cancel request did."""

    CANCELLED = "cancelled"     # was waiting (or is already cancelled)
    CANCELLING = "cancelling"   # running: stops at its next step
    COMPLETED = "completed"     # too late: already ended
    FAILED = "failed"
    MISSING = "missing"


class RequeueOutcome(str, Enum):
    """What the reaper did with a dead worker's job."""

    REQUEUED = "requeued"     # waiting again, first in its priority class, as a new attempt
    FAILED = "failed"         # it had killed tasks.max_attempts workers
    CANCELLED = "cancelled"   # the client cancelled it while it ran
    TAKEN = "taken"           # not that worker's attempt any more: another reaper was first


@dataclass(frozen=True)
class Requeue:
    """The reaper's outcome for one job; `attempt` is the new attempt when requeued."""

    outcome: RequeueOutcome
    attempt: int = 0


@dataclass(frozen=True)
class RunningJob:
    """A task in `processing`, as the reaper sees it."""

    task_id: str
    worker: str
    attempt: int
    queue: str
    model: str | None   # None: the hash has no such field (its waiting indexes are skipped, as for any job)
    owner: str | None
    priority: str
    started_at: float = 0.0   # when this attempt was taken (the taking worker's clock)
    time_limit: float = 0.0   # the job's own time limit (JobSpec.time_limit, a training job's); 0: tasks.time_limit
    max_attempts: int = 0     # the job's own attempts (JobSpec.max_attempts, a training job's); 0: tasks.max_attempts


FINAL_EVENTS = ("completed", "failed", "cancelled")
EVENT_KINDS = ("queued", "started", "progress", "preview", *FINAL_EVENTS)


@dataclass(frozen=True)
class TaskEvent:
    """One entry of a task's event log: its id (a Redis stream id, what SSE's Last-Event-ID names), its kind
    (EVENT_KINDS) and its recorded fields (strings, as the Lua scripts wrote them)."""

    id: str
    kind: str
    fields: dict

    @property
    def final(self) -> bool:
        return self.kind in FINAL_EVENTS


@dataclass(frozen=True)
class Progressed:
    """A progress write that was made: the ETA the step measured (seconds as text; '' when not known yet)."""

    eta: str


@dataclass(frozen=True)
class Preview:
    """A running job's newest preview: a small image of its latents at `step` of `total`, as a data URL."""

    step: int
    total: int
    image: str
    width: int
    height: int

    def to_dict(self) -> dict:
        return {"step": self.step, "total": self.total, "image": self.image, "width": self.width,
                "height": self.height}
