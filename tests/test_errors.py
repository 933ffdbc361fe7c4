"""Errors from the public surface are Dockyard errors (and still the built-in kind
Python code expects), and clients only ever see their public message."""

from __future__ import annotations

import pytest

from dockyard import Request, Response, switch_port
from dockyard.errors import (
    ContainerGone,
    DockyardError,
    EngineUnavailable,
    InvalidArgument,
    NoCapacity,
    StartFailed,
)


def test_bad_arguments_are_dockyard_errors_and_value_errors() -> None:
    with pytest.raises(InvalidArgument, match="port must be an integer 1-65535") as caught:
        switch_port(Request("http://x/"), 70000)
    assert isinstance(caught.value, DockyardError) and isinstance(caught.value, ValueError)
    with pytest.raises(InvalidArgument, match="between 100 and 599"):
        Response("x", status=700)
    with pytest.raises(InvalidArgument, match="redirect status"):
        Response.redirect("/elsewhere", status=200)


def test_public_messages_hide_internals() -> None:
    secret = "db_password=hunter2 at /var/run/docker.sock"
    for error in (StartFailed(secret), ContainerGone(secret), EngineUnavailable(secret)):
        assert secret not in error.public
    assert EngineUnavailable(secret).public == "engine unavailable"
    # Messages that only say which limit was hit are shown as they are.
    assert NoCapacity("max_instances (2) reached").public == "max_instances (2) reached"
