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


class JobTimeLimit(SdqError):
    """The job ran past tasks.time_limit."""


class ModelError(SdqError):
    """The pipeline could not run this job (bad LoRA, OOM, invalid input)."""


class StorageError(SdqError):
    """The object store failed (infrastructure, not the job's fault)."""
