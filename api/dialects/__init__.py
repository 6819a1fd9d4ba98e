"""API dialects: one package each (routes, schemas, translation to and from the canonical JobSpec).

Adding a dialect: a new folder here whose routes module defines a module-level
flask-smorest `blp` (its before_request checks the key with
`services().keys.check(...)`; its error shape goes in api.errors.DIALECT_RENDERERS),
and one line in BLUEPRINTS. Its name also goes in api.auth.DIALECTS so keys
can be limited to it. Nothing in worker/ changes.
"""
from __future__ import annotations

from flask_smorest import Blueprint

from api.dialects import a1111, aws, draw, eks, native

BLUEPRINTS: tuple[Blueprint, ...] = (
    native.blp,              # /api/v1: the native API
    a1111.blp,               # /sdapi/v1: the AUTOMATIC1111 web UI API
    a1111.controlnet_blp,    # /controlnet/*: the sd-webui-controlnet extension's API
    draw.blp,                # /v1/draw
    eks.blp,                 # POST /: SD on EKS
    aws.inference_blp,       # /inference/*, /endpoints: the AWS SD extension API
    aws.checkpoints_blp,     # /checkpoint(s), /upload_checkpoint: the same extension's model API
)
