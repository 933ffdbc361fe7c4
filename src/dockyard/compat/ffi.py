"""Stand-ins for ``pyodide.ffi``: Dockyard runs CPython, so there is no JavaScript side.

``to_js`` and ``to_py`` return the value itself (``to_js`` applies ``dict_converter`` to
dicts, so ``to_js(d, dict_converter=Object.fromEntries)`` still gives a dict);
``create_proxy`` returns a proxy whose ``destroy()`` does nothing. Code that only moves
values between Python and Cloudflare's APIs runs unchanged; code that calls into
JavaScript itself cannot run here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

__all__ = [
    "JsException",
    "JsProxy",
    "create_once_callable",
    "create_proxy",
    "destroy_proxies",
    "to_js",
    "to_py",
]


class JsException(Exception):
    """Never raised by Dockyard; importable so ``except JsException`` works."""


class JsProxy:
    """A value wrapped by ``create_proxy``: calls, attributes and awaits reach it."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._value(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._value, name)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._value.__await__()

    def destroy(self) -> None:
        """Nothing to release: there is no JavaScript garbage collector to tell."""

    def to_py(self) -> Any:
        return self._value


def create_proxy(value: Any, **_options: Any) -> JsProxy:
    return JsProxy(value)


def create_once_callable(function: Callable[..., Any], **_options: Any) -> JsProxy:
    return JsProxy(function)


def destroy_proxies(proxies: Iterable[Any]) -> None:
    """Nothing to release."""


DictConverter = Callable[[Iterable[tuple[Any, Any]]], Any]


def to_js(
    value: Any,
    *,
    dict_converter: Callable[[Iterable[tuple[Any, Any]]], Any] | None = None,
    **_: Any,
) -> Any:
    if dict_converter is None:
        return value
    return _convert(value, dict_converter)


def _convert(value: Any, dict_converter: DictConverter) -> Any:
    if isinstance(value, dict):
        return dict_converter((k, _convert(v, dict_converter)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_convert(v, dict_converter) for v in value]
    return value


def to_py(value: Any, **_options: Any) -> Any:
    return value.to_py() if isinstance(value, JsProxy) else value
