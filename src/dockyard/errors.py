"""Dockyard's one error tree.

Every error knows the HTTP status a client sees and the exit code the CLI uses, so
each edge (the gateway, the CLI) has exactly one handler that turns it into a
response or a message.

    DockyardError                      500 / exit 1
    ├── ConfigError                    exit 2    bad wrangler config, .dev.vars, main module
    ├── InvalidArgument                500       a bad value passed to Dockyard's API (a ValueError)
    ├── InvalidType                    500       a value of the wrong type (a TypeError)
    ├── WorkerError                    500       the user's worker could not be loaded or run
    │   └── InvalidHeader              500       a header that cannot go on the wire (CR, LF, NUL)
    ├── ClientError                    400       the client broke off or garbled its request body
    │   └── RequestTimeout             408       a client sent its request body too slowly
    ├── DeployConflict                 409       another deploy of the app holds its deploy lock
    ├── BindingError                   500       KV, D1 or assets misuse (bad key, bad SQL, ...)
    ├── ObjectError                    500       Durable Object misuse
    │   ├── InvalidObjectId            400       malformed id string
    │   │   └── InvalidObjectName      400       name too long or not valid Unicode
    │   ├── MethodNotFound             404       stub call to a private or unknown method
    │   ├── StorageError               500       bad key/value, size limits, refused SQL
    │   ├── DataCloneError             500       an RPC argument or result cannot be copied
    │   └── ObjectReset                500       the object was reset (abort, failed constructor)
    └── ContainerError                 500       anything the container runtime reports
        ├── EngineUnavailable          503 / exit 3   no engine answering on DOCKER_HOST
        ├── ImageError                 500       build failed or image missing
        ├── NoCapacity                 503       max_instances reached, no room to start
        ├── TooManyStarts              429       start rate limit
        ├── StartFailed                500       bad entrypoint, port never opened, ...
        └── ContainerGone              502       the container vanished mid-request
"""

from __future__ import annotations

import secrets


class DockyardError(Exception):
    status: int = 500
    exit_code: int = 1
    # What an HTTP client may read. The message itself can carry internals (a container's
    # last output, paths, engine errors) and goes to the log only; None means the message
    # is safe to show as it is.
    public_message: str | None = "internal error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def public(self) -> str:
        return self.message if self.public_message is None else self.public_message


def error_id() -> str:
    """A short id that ties what a client saw to the log line with the details."""
    return secrets.token_hex(4)


class ConfigError(DockyardError):
    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        path: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.path = path
        where = ""
        if file:
            where = file if line is None else f"{file}:{line}"
        if path:
            where = f"{where}: {path}" if where else path
        super().__init__(f"{where}: {message}" if where else message)
        self.detail = message


class InvalidArgument(DockyardError, ValueError):
    """A bad value given to Dockyard's API; also a ValueError, as Python code expects."""


class InvalidType(DockyardError, TypeError):
    """A value of the wrong type given to Dockyard's API; also a TypeError."""


class WorkerError(DockyardError):
    pass


class InvalidHeader(WorkerError):
    """A header name or value that would corrupt the message: never sent."""


class ClientError(DockyardError):
    status = 400
    public_message = "Bad Request: the request body was cut off or malformed"


class RequestTimeout(ClientError):
    status = 408
    public_message = "Request Timeout: the request body was too slow"


class DeployConflict(DockyardError):
    """A deploy of an app while another deploy of it is still open (its lock unexpired)."""

    status = 409
    public_message = None  # names the app and when the lock expires: nothing internal


class BindingError(DockyardError):
    pass


class ObjectError(DockyardError):
    pass


class InvalidObjectId(ObjectError):
    status = 400
    public_message = None


class InvalidObjectName(InvalidObjectId):
    status = 400
    public_message = None


class MethodNotFound(ObjectError):
    status = 404
    public_message = None


class StorageError(ObjectError):
    pass


class ObjectReset(ObjectError):
    pass


class DataCloneError(ObjectError, TypeError):
    """Also a TypeError, which is what Cloudflare raises for a value RPC cannot send."""


class ContainerError(DockyardError):
    public_message: str | None = "container error"


class EngineUnavailable(ContainerError):
    status = 503
    exit_code = 3
    public_message = "engine unavailable"

    def __init__(self, message: str = "engine unavailable", *, address: str = "") -> None:
        super().__init__(message)
        # Where the engine was expected (a socket path): for the log and console only.
        self.address = address


class ImageError(ContainerError):
    public_message = "the container image is not available"


class NoCapacity(ContainerError):
    status = 503
    public_message = None  # says which limit was hit: nothing internal


class TooManyStarts(ContainerError):
    status = 429
    public_message = None


class StartFailed(ContainerError):
    public_message = "the container did not start"


class ContainerGone(ContainerError):
    status = 502
    public_message = "the container stopped while handling the request; try again"
