"""The namespace binding (``env.MY_OBJECT``): ids and stubs for one class."""

from __future__ import annotations

import copy

from dockyard.errors import InvalidObjectId

from .ids import DurableObjectId, IdFactory
from .stub import DurableObjectStub, ObjectDelivery

__all__ = ["DurableObjectNamespace"]


class DurableObjectNamespace:
    def __init__(
        self,
        class_name: str,
        *,
        app: str,
        delivery: ObjectDelivery,
        ids: IdFactory | None = None,
    ) -> None:
        self.class_name = class_name
        self._ids = ids or IdFactory(app, class_name)
        self._delivery = delivery

    def __repr__(self) -> str:
        return f"<DurableObjectNamespace {self.class_name}>"

    # Whether stubs copy RPC arguments and results (Cloudflare's semantics). The worker's
    # env holds the copying form (with_rpc_copies); host.namespace() stays in-process
    # for Dockyard's own tools and tests, which may pass live objects.
    copies_rpc = False

    def with_rpc_copies(self) -> DurableObjectNamespace:
        twin = copy.copy(self)
        twin.copies_rpc = True
        return twin

    def id_from_name(self, name: str) -> DurableObjectId:
        """The id for ``name``: the same on every call, host and restart."""
        return self._ids.from_name(name)

    def new_unique_id(self) -> DurableObjectId:
        return self._ids.unique()

    def id_from_string(self, hex_id: str) -> DurableObjectId:
        """Parse ``str(id)`` back; InvalidObjectId if malformed or from another namespace."""
        return self._ids.from_string(hex_id)

    def get(
        self,
        object_id: DurableObjectId,
        *,
        location_hint: str | None = None,
        locationHint: str | None = None,  # Cloudflare's spelling
    ) -> DurableObjectStub:
        """A stub for ``object_id`` (returned at once; the object is created on first call).

        ``location_hint`` / ``locationHint`` is accepted and ignored: one node, one place.
        """
        if not isinstance(object_id, DurableObjectId):
            raise InvalidObjectId(
                f"get() takes a DurableObjectId, got {type(object_id).__name__}; use "
                f"id_from_string(), id_from_name() or get_by_name()"
            )
        if not self._ids.owns(object_id):
            raise InvalidObjectId(
                f"id {object_id.hex[:12]}… belongs to namespace {object_id.namespace!r}, "
                f"not {self.class_name!r}"
            )
        return DurableObjectStub(self._delivery, self.class_name, object_id, copies=self.copies_rpc)

    def get_by_name(
        self,
        name: str,
        *,
        location_hint: str | None = None,
        locationHint: str | None = None,  # Cloudflare's spelling
    ) -> DurableObjectStub:
        return self.get(self.id_from_name(name))

    # Cloudflare's spellings.
    idFromName = id_from_name
    newUniqueId = new_unique_id
    idFromString = id_from_string
    getByName = get_by_name
