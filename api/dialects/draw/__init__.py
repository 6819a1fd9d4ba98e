"""The /v1/draw API: one synchronous call, answered with image URLs."""
from api.dialects.draw.routes import blp

__all__ = ["blp"]
