"""The AWS SD extension API: /inference/v2 jobs on worker pools (its endpoints), and uploaded checkpoints.

Two blueprints: `inference_blp` (inference, endpoints, model lists) and
`checkpoints_blp` (checkpoints uploaded into S3, training datasets, the base
models for training and the training jobs), as the extension's
middleware splits them; errors differ between the two (see errors.py).
"""
from api.dialects.aws import datasets as _datasets  # noqa: F401 - adds the dataset routes to checkpoints_blp
from api.dialects.aws import merges as _merges  # noqa: F401 - adds /inference/run-model-merge to inference_blp
from api.dialects.aws import models as _models  # noqa: F401 - adds POST/PUT /model, GET /models to checkpoints_blp
from api.dialects.aws import trainings as _trainings  # noqa: F401 - adds POST/PUT /train, GET /trains to it
from api.dialects.aws.checkpoints import blp as checkpoints_blp
from api.dialects.aws.routes import blp as inference_blp

__all__ = ["checkpoints_blp", "inference_blp"]
