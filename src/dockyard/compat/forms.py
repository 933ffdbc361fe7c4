"""``Blob``, ``File`` and ``FormData`` of Cloudflare's ``workers`` module, in plain Python.

``await request.form_data()`` reads ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies; a ``FormData`` given as a ``Response`` body is sent as
``multipart/form-data``. Values are ``str`` or ``File`` (uploads).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, MutableMapping
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["Blob", "File", "FormData", "encode_form", "parse_form"]


class Blob:
    _data: bytes
    content_type: str

    def __init__(
        self, blob_parts: Iterable[Any] | Any = (), content_type: str | None = None, **_: Any
    ) -> None:
        if isinstance(blob_parts, str | bytes | bytearray | memoryview | Blob):
            blob_parts = [blob_parts]
        chunks = []
        for part in blob_parts:
            if isinstance(part, Blob):
                chunks.append(part._data)
                content_type = content_type or part.content_type
            elif isinstance(part, str):
                chunks.append(part.encode())
            else:
                chunks.append(bytes(part))
        self._data = b"".join(chunks)
        self.content_type = content_type or ""

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def type(self) -> str:
        return self.content_type

    async def bytes(self) -> bytes:
        return self._data

    async def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")

    def slice(
        self, start: int | None = None, end: int | None = None, content_type: str | None = None
    ) -> Blob:
        return Blob([self._data[start:end]], content_type)


class File(Blob):
    def __init__(
        self,
        blob_parts: Iterable[Any] | Any,
        filename: str,
        content_type: str | None = None,
        last_modified: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__(blob_parts, content_type)
        self.name = filename
        self.last_modified = last_modified if last_modified is not None else int(time.time() * 1000)

    def __repr__(self) -> str:
        return f"<File {self.name!r} {self.size} bytes>"


FormValue = str | File


class FormData(MutableMapping[str, FormValue]):
    """Ordered, multi-valued form fields: ``form["k"]`` is the first value."""

    def __init__(self, form_data: dict[str, Any] | None = None) -> None:
        self._items: list[tuple[str, FormValue]] = []
        for key, value in (form_data or {}).items():
            self.append(key, value)

    def append(self, key: str, value: Any, filename: str | None = None) -> None:
        if isinstance(value, Blob) and not isinstance(value, File):
            value = File([value], filename or "blob", value.content_type)
        elif isinstance(value, File) and filename is not None:
            value = File([value], filename, value.content_type)
        elif not isinstance(value, File):
            value = str(value)
        self._items.append((key, value))

    def __getitem__(self, key: str) -> FormValue:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.delete(key)
        self.append(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.delete(key)

    def delete(self, key: str) -> None:
        self._items = [(k, v) for k, v in self._items if k != key]

    def get_all(self, key: str) -> list[FormValue]:
        return [v for k, v in self._items if k == key]

    getAll = get_all

    def __iter__(self) -> Iterator[str]:
        seen: list[str] = []
        for key, _ in self._items:
            if key not in seen:
                seen.append(key)
        return iter(seen)

    def __len__(self) -> int:
        return len(set(k for k, _ in self._items))

    def items(self) -> Any:  # every pair, repeated keys included, as in the web API
        return list(self._items)

    def __repr__(self) -> str:
        return f"FormData({self._items!r})"


def parse_form(content_type: str, body: bytes) -> FormData:
    """A FormData from a request body; TypeError for other content types."""
    kind = content_type.split(";", 1)[0].strip().lower()
    form = FormData()
    if kind == "application/x-www-form-urlencoded":
        for key, value in parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True):
            form.append(key, value)
        return form
    if kind != "multipart/form-data":
        raise TypeError(f"form_data() needs a form body, got content-type {content_type!r}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        if not isinstance(part, Message):
            continue
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            form.append(name, File([data], filename, part.get_content_type()))
        else:
            charset = part.get_content_charset() or "utf-8"
            form.append(name, data.decode(charset, errors="replace"))
    return form


def encode_form(form: FormData) -> tuple[bytes, str]:
    """``multipart/form-data`` body and its content type."""
    boundary = "----dockyard" + secrets.token_hex(12)
    out = bytearray()
    for key, value in form.items():
        out += f"--{boundary}\r\n".encode()
        quoted = key.replace('"', "%22")
        if isinstance(value, File):
            name = value.name.replace('"', "%22")
            out += (
                f'Content-Disposition: form-data; name="{quoted}"; filename="{name}"\r\n'
                f"Content-Type: {value.content_type or 'application/octet-stream'}\r\n\r\n"
            ).encode()
            out += value._data
        else:
            out += f'Content-Disposition: form-data; name="{quoted}"\r\n\r\n'.encode()
            out += value.encode()
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
