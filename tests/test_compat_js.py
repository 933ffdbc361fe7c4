"""The `js` and `pyodide.ffi` stand-ins, in process."""

from __future__ import annotations

from dockyard.compat.ffi import create_proxy, to_js, to_py
from dockyard.compat.js import JSON, Object, WebSocketPair


def test_js_object_helpers_on_a_websocket_pair() -> None:
    pair = WebSocketPair.new()
    client, server = Object.values(pair)  # the chatroom example's spelling
    assert (client, server) == pair.object_values() and client.peer is server
    assert Object.fromEntries([("a", 1)]) == {"a": 1}
    assert Object.entries({"a": 1}) == [("a", 1)]
    assert JSON.parse(JSON.stringify({"a": [1]})) == {"a": [1]}


def test_ffi_passes_values_through() -> None:
    proxy = create_proxy(lambda: "called")
    assert proxy() == "called" and proxy.destroy() is None
    assert to_js({"a": {"b": 1}}, dict_converter=Object.fromEntries) == {"a": {"b": 1}}
    assert to_py(proxy)() == "called"
