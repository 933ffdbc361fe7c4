"""Where each key sits in a JSONC (or TOML) config, so config errors can name a line.

Neither `json5.loads` nor `tomllib` keeps positions. `key_lines` walks JSONC text once
more (it only runs on text json5 already accepted) and maps every key path, spelled like
`containers[0].max_instances`, to the line where that key (or array element) starts;
`toml_key_lines` does the same, line by line, for TOML.
"""

from __future__ import annotations

import re

import json5

__all__ = ["child_path", "key_lines", "syntax_error_line", "toml_key_lines"]

_DELIMITERS = ",:]}/ \t\r\n"


def child_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def key_lines(text: str) -> dict[str, int]:
    """Map each key path in `text` to its 1-based line; the root object is `""`."""
    scanner = _Scanner(text)
    try:
        scanner.value("")
    except IndexError:
        pass  # Only reachable on text json5 rejected; keep what was found.
    return scanner.lines


def syntax_error_line(error: ValueError) -> tuple[int | None, str]:
    """Split json5's `<string>:3 Unexpected "}" at column 6` into (3, the rest)."""
    match = re.match(r"<string>:(\d+)\s+(.*)", str(error), re.DOTALL)
    if match is None:
        return None, str(error)
    return int(match[1]), match[2]


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[str, int] = {}

    def skip_blank(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\n":
                self.line += 1
                self.pos += 1
            elif char.isspace() or char == "\ufeff":
                self.pos += 1
            elif text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = len(text) if end == -1 else end
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                end = len(text) if end == -1 else end + 2
                self.line += text.count("\n", self.pos, end)
                self.pos = end
            else:
                return

    def value(self, path: str) -> None:
        self.skip_blank()
        self.lines.setdefault(path, self.line)
        char = self.text[self.pos]
        if char == "{":
            self.object(path)
        elif char == "[":
            self.array(path)
        elif char in "\"'":
            self.string()
        else:
            self.bare_word()

    def object(self, path: str) -> None:
        self.pos += 1
        while True:
            self.skip_blank()
            if self.text[self.pos] == "}":
                self.pos += 1
                return
            key_line = self.line
            key = self.string() if self.text[self.pos] in "\"'" else self.bare_word()
            child = child_path(path, key)
            self.lines[child] = key_line
            self.skip_blank()
            self.pos += 1  # the ':'
            self.value(child)
            self.skip_comma()

    def array(self, path: str) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip_blank()
            if self.text[self.pos] == "]":
                self.pos += 1
                return
            child = child_path(path, index)
            self.lines[child] = self.line
            self.value(child)
            self.skip_comma()
            index += 1

    def skip_comma(self) -> None:
        self.skip_blank()
        if self.text[self.pos] == ",":
            self.pos += 1

    def string(self) -> str:
        start = self.pos
        quote = self.text[start]
        self.pos += 1
        while self.text[self.pos] != quote:
            if self.text[self.pos] == "\\":
                self.pos += 1
            if self.text[self.pos] == "\n":
                self.line += 1
            self.pos += 1
        self.pos += 1
        raw = self.text[start : self.pos]
        if "\\" not in raw:
            return raw[1:-1]
        decoded = json5.loads(raw)
        return decoded if isinstance(decoded, str) else raw[1:-1]

    def bare_word(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _DELIMITERS:
            self.pos += 1
        return self.text[start : self.pos]


def toml_key_lines(text: str) -> dict[str, int]:
    """Key path -> line for TOML, line by line: table headers, arrays of tables, `key =`.
    Keys inside multi-line inline values resolve to the enclosing key's line."""
    lines: dict[str, int] = {"": 1}
    arrays: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string: str | None = None

    def resolve(keys: tuple[str, ...]) -> str:
        path = ""
        for depth, key in enumerate(keys, start=1):
            path = child_path(path, key)
            if keys[:depth] in arrays:
                path = child_path(path, arrays[keys[:depth]])
        return path

    def split(dotted: str) -> tuple[str, ...]:
        return tuple(part.strip().strip("\"'") for part in dotted.split("."))

    for number, raw in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if raw.count(in_string) % 2 == 1:
                in_string = None
            continue
        line = raw.strip()
        if header := re.match(r"\[\[([^\]]+)\]\]", line):
            table = split(header[1])
            lines.setdefault(child_path(resolve(table[:-1]), table[-1]), number)
            arrays[table] = arrays.get(table, -1) + 1
            for nested in [k for k in arrays if len(k) > len(table) and k[: len(table)] == table]:
                del arrays[nested]
            lines[resolve(table)] = number
        elif header := re.match(r"\[([^\]]+)\]", line):
            table = split(header[1])
            lines.setdefault(resolve(table), number)
        elif assignment := re.match(r"([A-Za-z0-9_\-.\"' ]+?)\s*=(.*)", line):
            keys = table + split(assignment[1])
            for depth in range(len(table) + 1, len(keys) + 1):
                lines.setdefault(resolve(keys[:depth]), number)
            lines[resolve(keys)] = number
            for quote in ('"""', "'''"):
                if assignment[2].count(quote) % 2 == 1:
                    in_string = quote
    return lines
