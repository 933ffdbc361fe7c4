"""Stubs: the caller's handle on an object, reaching it through one delivery seam."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from dockyard.compat.clone import clone
from dockyard.http import BodyInit, HeadersInit, Request, Response

from .ids import DurableObjectId

__all__ = ["DurableObjectStub", "ObjectDelivery"]


class ObjectDelivery(Protocol):
    """Where stubs send calls: the local ObjectHost, or later a route to another machine."""

    async def deliver_fetch(
        self, class_name: str, object_id: DurableObjectId, request: Request
    ) -> Response: ...

    async def deliver_call(
        self,
        class_name: str,
        object_id: DurableObjectId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any: ...


class DurableObjectStub:
    """``await stub.fetch(...)`` reaches ``fetch``; ``await stub.method(...)`` calls a method."""

    __slots__ = ("_class_name", "_copies", "_delivery", "id", "name")

    def __init__(
        self,
        delivery: ObjectDelivery,
        class_name: str,
        object_id: DurableObjectId,
        *,
        copies: bool = False,
    ) -> None:
        self._delivery = delivery
        self._copies = copies
        self._class_name = class_name
        self.id = object_id
        self.name = object_id.name

    def __repr__(self) -> str:
        return f"<DurableObjectStub {self._class_name} {self.name or self.id.hex[:12]}>"

    async def fetch(
        self,
        input: str | Request,
        *,
        method: str | None = None,
        headers: HeadersInit = None,
        body: BodyInit = None,
    ) -> Response:
        """Send a request (the same arguments as ``Request(...)``) to the object's fetch."""
        if isinstance(input, Request) and method is None and headers is None and body is None:
            request = input
        else:
            request = Request(input, method=method, headers=headers, body=body)
        return await self._delivery.deliver_fetch(self._class_name, self.id, request)

    def __getattr__(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        if method.startswith("__") and method.endswith("__"):
            raise AttributeError(method)
        delivery, class_name, object_id = self._delivery, self._class_name, self.id
        if not self._copies:

            async def call_in_process(*args: Any, **kwargs: Any) -> Any:
                return await delivery.deliver_call(class_name, object_id, method, args, kwargs)

            call_in_process.__name__ = call_in_process.__qualname__ = method
            return call_in_process

        async def call(*args: Any, **kwargs: Any) -> Any:
            # Copied both ways, as Cloudflare's RPC serialises them: neither side can
            # change a value the other holds. An uncopyable argument fails here.
            where = f"{class_name}.{method}()"
            args = tuple(clone(a, f"argument {i} of {where}") for i, a in enumerate(args, 1))
            kwargs = {k: clone(v, f"argument {k!r} of {where}") for k, v in kwargs.items()}
            result = await delivery.deliver_call(class_name, object_id, method, args, kwargs)
            return clone(result, f"the result of {where}")

        call.__name__ = call.__qualname__ = method
        return call
