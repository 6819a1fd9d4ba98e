"""sdqueue's Python client: `Client` (sync) and `AsyncClient` with the same methods, and the `sdq` CLI."""
__version__ = "0.1.0"

from sdqueue_client.core import Result  # noqa: E402
from sdqueue_client.errors import (  # noqa: E402
    ApiError, BadRequest, Conflict, ConnectionProblem, Forbidden, JobFailed, MethodNotAllowed, NotFound,
    RateLimited, SdqError, ServerError, StreamBroken, Unauthorized, Unavailable, ValidationError,
)
from sdqueue_client.events import Event  # noqa: E402
from sdqueue_client.client import Client  # noqa: E402
from sdqueue_client.aio import AsyncClient  # noqa: E402

__all__ = ["Client", "AsyncClient", "Result", "Event", "SdqError", "ApiError", "BadRequest", "Unauthorized",
           "Forbidden", "NotFound", "MethodNotAllowed", "Conflict", "ValidationError", "RateLimited", "Unavailable",
           "ServerError", "ConnectionProblem", "StreamBroken", "JobFailed", "__version__"]
