"""Dockyard's one error tree.

Every error knows the HTTP status a client sees and the exit code the CLI uses, so
each edge (the gateway, the CLI) has exactly one handler that turns it into a
response or a message.

    DockyardError                      500 / exit 1
    ├── ConfigError                    exit 2    bad wrangler config, .dev.vars, main module
    ├── WorkerError                    500       the user's worker could not be loaded or run
    ├── ObjectError                    500       Durable Object misuse
    │   ├── InvalidObjectId            400       malformed id string
    │   ├── MethodNotFound             404       stub call to a private or unknown method
    │   ├── StorageError               500       bad key/value, size limits, refused SQL
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


class DockyardError(Exception):
    status: int = 500
    exit_code: int = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


class WorkerError(DockyardError):
    pass


class ObjectError(DockyardError):
    pass


class InvalidObjectId(ObjectError):
    status = 400


class MethodNotFound(ObjectError):
    status = 404


class StorageError(ObjectError):
    pass


class ObjectReset(ObjectError):
    pass


class ContainerError(DockyardError):
    pass


class EngineUnavailable(ContainerError):
    status = 503
    exit_code = 3


class ImageError(ContainerError):
    pass


class NoCapacity(ContainerError):
    status = 503


class TooManyStarts(ContainerError):
    status = 429


class StartFailed(ContainerError):
    pass


class ContainerGone(ContainerError):
    status = 502
