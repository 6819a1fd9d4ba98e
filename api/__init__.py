"""The sdqueue HTTP API: `create_app(settings)` builds the Flask app.

Why a factory: gunicorn calls `api:create_app()` in each worker process,
tests call it with their own settings, and nothing is configured at import.
The API never imports torch or diffusers.
"""
from __future__ import annotations

import logging

import redis
from flask import Flask
from flask_smorest import Api
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from api.auth import KeyRing, parse_keys
from api.errors import dialect_error, http_error, unexpected_error
from api import metrics
from api.fastsubmit import FastSubmit
from api.limits import RateLimits
from api.services import Catalog, Services
from api.stage import StagePrefix
from api.submission import SyncTimeout
from api.waiter import EventHub, StreamsFull, WaitersFull
from common.errors import QueueFull, StorageError
from common.queue import MessageBuilder, create_celery
from common.settings import Settings, load_settings
from common.storage import Storage
from common.store import open_stores

log = logging.getLogger("sdqueue.api")
SWAGGER_UI_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"
REDOC_URL = "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"
RETRY_AFTER_SECONDS = "5"


class SdqApi(Api):
    """flask-smorest's Api, rendering errors in the native API's {"detail": ...} shape."""

    def handle_http_exception(self, error: HTTPException):
        return http_error(error)


def openapi_config(settings: Settings) -> dict:
    return {
        "API_TITLE": "sdqueue", "API_VERSION": "1.0", "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/", "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs", "OPENAPI_SWAGGER_UI_URL": SWAGGER_UI_URL,
        "OPENAPI_REDOC_PATH": "redoc", "OPENAPI_REDOC_URL": REDOC_URL,
        "MAX_CONTENT_LENGTH": settings.api.max_body_bytes,
    }


def build_services(settings: Settings) -> Services:
    keys = parse_keys(settings.api.keys, reserved_queues=(settings.callbacks.queue,))
    if not keys:
        log.warning("no API keys configured (api.keys / SDQ_API_KEYS): every authenticated call will get 401")
    celery = create_celery(settings, name="sdqueue-api")
    stores = open_stores(settings.redis.url, settings.tasks.retention_seconds, settings.aws.models_prefix,
                         settings.datasets.prefix)
    return Services(
        settings=settings,
        store=stores.tasks,
        workers=stores.workers,
        pools=stores.pools,
        checkpoints=stores.checkpoints,
        a1111=stores.a1111,
        storage=Storage(settings),
        celery=celery,
        messages=MessageBuilder(celery),
        keys=KeyRing(keys, settings.api.key_header, settings.tasks.max_pending_per_key, stores.auth_failures,
                     settings.api.auth_failures_per_minute),
        catalog=Catalog(settings.models_dir, settings.lora_dir, settings.models.default, settings.models.overrides),
        datasets=stores.datasets,
        train_jobs=stores.train_jobs,
        model_jobs=stores.model_jobs,
        waits=EventHub(stores.tasks, settings.api.max_waiters, settings.api.max_streams),
    )


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(redis.RedisError)
    def redis_down(error: redis.RedisError):
        log.error("task store unavailable: %s", error)
        if isinstance(error, redis.exceptions.OutOfMemoryError):   # maxmemory + noeviction: writes are refused
            return dialect_error(503, "task store is full (Redis maxmemory); retry later",
                                 {"Retry-After": RETRY_AFTER_SECONDS})
        return dialect_error(503, "task store unavailable; retry shortly", {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(StorageError)
    def storage_down(error: StorageError):
        log.error("object store unavailable: %s", error)
        return dialect_error(503, "object store unavailable; retry shortly", {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(OperationalError)
    def broker_down(error: OperationalError):
        log.error("broker unavailable: %s", error)
        if "maxmemory" in str(error):      # kombu's wrapping of Redis' OOM answer
            return dialect_error(503, "task store is full (Redis maxmemory); retry later",
                                 {"Retry-After": RETRY_AFTER_SECONDS})
        return dialect_error(503, "queue unavailable; retry shortly", {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(QueueFull)
    def queue_full(error: QueueFull):
        return dialect_error(503, str(error), {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(WaitersFull)
    def too_many_waiting(error: WaitersFull):
        return dialect_error(503, "too many synchronous requests are waiting on this API process; retry shortly",
                             {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(StreamsFull)
    def too_many_streams(error: StreamsFull):
        return dialect_error(503, "too many event streams are open on this API process; reconnect shortly",
                             {"Retry-After": RETRY_AFTER_SECONDS})

    @app.errorhandler(SyncTimeout)
    def sync_timeout(error: SyncTimeout):
        return dialect_error(504, str(error))

    @app.errorhandler(RecursionError)
    def too_deep(error: RecursionError):   # raised by the JSON parser on absurdly nested bodies
        return dialect_error(400, "Malformed JSON body: nested too deeply")

    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API app; settings default to config.yaml + SDQ_* environment."""
    settings = settings or load_settings()
    app = Flask("sdqueue")
    app.config.update(openapi_config(settings))
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    svc = build_services(settings)
    app.extensions["sdq"] = svc
    try:
        svc.storage.ensure_bucket()
    except StorageError as exc:   # S3 may come up after the API; uploads answer 503 until then
        log.warning("could not ensure bucket %s: %s", settings.storage.bucket, exc)
    register_blueprints(app, settings)
    limits = RateLimits(settings)
    limits.init_app(app)              # after the blueprints: it wraps the views marked with a limit scope
    app.extensions["sdq_limits"] = limits
    register_error_handlers(app)
    observe_fast_submit = metrics.install(app, settings, svc, limits)   # GET /metrics, request timing
    if settings.api.fast_submit:
        from api.dialects import native

        app.wsgi_app = FastSubmit(app.wsgi_app, svc, native.GENERATE_REQUEST, native.build_jobspec,
                                  native.created_body, observe=observe_fast_submit)
    if settings.api.stage_prefix.strip("/"):
        app.wsgi_app = StagePrefix(app.wsgi_app, settings.api.stage_prefix)
    return app


def register_blueprints(app: Flask, settings: Settings) -> None:
    """Health, every dialect (api/dialects), with the OpenAPI document's security schemes, and the playground.

    Inside the app context: the schemas' bounds are this app's settings
    (api/schemas.py: Setting), read while the document is built.
    """
    from api import health, playground
    from api.dialects import BLUEPRINTS

    api = SdqApi(app, spec_kwargs={"info": {"description": "Distributed Stable Diffusion service"}})
    api.spec.components.security_scheme("ApiKeyAuth", {"type": "apiKey", "in": "header",
                                                       "name": settings.api.key_header})
    api.spec.components.security_scheme("BasicAuth", {"type": "http", "scheme": "basic",
                                                      "description": "A1111 --api-auth style: any user, the API key as password"})
    api.spec.components.security_scheme("BearerAuth", {"type": "http", "scheme": "bearer"})
    with app.app_context():
        api.register_blueprint(health.blp)
        for blueprint in BLUEPRINTS:
            api.register_blueprint(blueprint)
    app.register_blueprint(playground.blp)    # plain Flask: static files, not operations of /openapi.json
