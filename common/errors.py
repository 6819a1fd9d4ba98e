"""Named errors shared by the API and the workers.

Why separate types: model errors (the pipeline raised) and infrastructure
errors (S3 or Redis failed) end a job differently and are reported
differently, and a missing task is an expected outcome, not a crash.
"""


class SdqError(Exception):
    """Base of every sdqueue error."""


class TaskNotFound(SdqError):
    """No task hash with that id (never created, expired, or not yours)."""


class JobCancelled(SdqError):
    """The client cancelled the job; raised inside the step callback."""


class StaleAttempt(SdqError):
    """This delivery lost the job to a newer attempt; it must write nothing."""


class JobHandedBack(StaleAttempt):
    """The worker is stopping (a warm shutdown): the job saved what it needs to resume and is left to the reaper,
    which resends it once this worker is gone; like a stale attempt, this delivery writes nothing more."""


class JobTimeLimit(SdqError):
    """The job ran past tasks.time_limit."""


class ModelError(SdqError):
    """The pipeline could not run this job (bad LoRA, OOM, invalid input)."""


class StorageError(SdqError):
    """The object store failed (infrastructure, not the job's fault)."""


class QueueFull(SdqError):
    """Too many jobs already wait (in the queue, or of this API key): refuse now rather than queue for hours."""

    def __init__(self, waiting: int, limit: int, per_key: bool = False):
        what = "this API key already has" if per_key else "the queue is full:"
        super().__init__(f"{what} {waiting} jobs waiting (limit {limit}); retry later")
