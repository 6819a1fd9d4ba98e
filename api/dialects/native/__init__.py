"""The native API (`/api/v1`): asynchronous jobs, polled, long-polled or called back.

Public: `blp` (registered by api/dialects), and what api/fastsubmit.py shares
with the route: the request schema, the JobSpec builder and the 202 body; and
the training request's schema (the AWS extension's /train checks the values
it maps with it, so both APIs accept the same ones).
"""
from api.dialects.native import datasets as _datasets  # noqa: F401 - adds /api/v1/datasets to blp
from api.dialects.native import merges as _merges  # noqa: F401 - adds /api/v1/merges to blp
from api.dialects.native import trainings as _trainings  # noqa: F401 - adds /api/v1/trainings to blp
from api.dialects.native.routes import blp
from api.dialects.native.schemas import GENERATE_REQUEST, TrainingCreateSchema
from api.dialects.native.translate import build_jobspec, created_body, render_task

__all__ = ["GENERATE_REQUEST", "TrainingCreateSchema", "blp", "build_jobspec", "created_body", "render_task"]
