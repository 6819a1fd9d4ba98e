"""Health: is the service up, and does any worker hold a warm pipeline?

Why no auth: load balancers and orchestrators probe it (as the native API documents).
"""
from __future__ import annotations

from flask_smorest import Blueprint

from api import schemas
from api.services import services
from common.timestamps import iso
from common.store.workers import WorkerState

blp = Blueprint("health", __name__, description="Service and worker health (no auth)")


def health_body() -> dict:
    svc = services()
    workers = svc.workers.live()

    def family(name: str) -> str | None:
        model = svc.catalog.model(name)
        return model.family if model else None

    return {
        "status": "ok",
        "model_loaded": any(w.models and w.state in (WorkerState.READY, WorkerState.BUSY) for w in workers),
        # No task ids here: health is unauthenticated, and tasks belong to their keys.
        "workers": [{"name": w.name, "device": w.device, "state": w.state, "busy": w.state == WorkerState.BUSY,
                     "models": w.models, "families": {m: family(m) for m in w.models}, "model_loads": w.model_loads,
                     "dtype": w.dtype, "max_batch": w.max_batch, "compiled": w.compiled, "speedups": w.speedups,
                     "queues": w.queues, "error": w.error, "last_seen": iso(w.last_seen)}
                    for w in workers],
    }


@blp.route("/health", methods=["GET"])
@blp.response(200, schemas.HealthSchema)
def health():
    """Service status; model_loaded is true when a live worker holds a warm pipeline."""
    return health_body()


@blp.route("/api/health", methods=["GET"])
@blp.response(200, schemas.HealthSchema)
def api_health():
    """Same as /health."""
    return health_body()
