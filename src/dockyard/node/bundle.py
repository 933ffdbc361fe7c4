"""Worker bundles: the project a deploy uploads, as one deterministic tar.gz.

`pack` runs on the deployer's machine. The same files always give the same bytes (sorted
names, mtime 0, owner 0, modes reduced to 0644/0755, gzip header without name or time),
so the bundle's sha256 says whether the code changed. `.dockyardignore` (gitignore
syntax, matched by pathspec as git matches) leaves files out; Dockyard's state, VCS
metadata, caches, virtualenvs and `.dev.vars` (local secrets) are never packed.

`unpack` runs on the node, on bytes from the network: it trusts nothing in the archive.
Only regular files and folders with plain relative names are written, the total size and
the number of entries are capped, and the result appears at `dest` all at once (a
temporary folder beside it, renamed at the end) or not at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, cast
from zlib import error as zlib_error

import pathspec

from dockyard.config import Config
from dockyard.errors import DockyardError

__all__ = [
    "ALWAYS_EXCLUDED",
    "IGNORE_FILE",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "BundleError",
    "BundleExists",
    "BundleTooLarge",
    "pack",
    "unpack",
]

IGNORE_FILE = ".dockyardignore"
# gitignore patterns that apply whatever the ignore file says: local state, VCS data,
# caches, environments, and local secrets (which reach a node only by `secret put`).
ALWAYS_EXCLUDED = (
    ".dockyard/",
    ".git/",
    "__pycache__/",
    ".venv/",
    "node_modules/",
    ".dev.vars",
    ".dev.vars.*",
)
# Defaults for `unpack`; the node passes its own `max_upload_bytes`-derived limits.
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_BUNDLE_FILES = 20_000

_CHUNK = 1024 * 1024
# zlib's default: level 9 costs three times the CPU (most of a pack) for a few % of size.
_GZIP_LEVEL = 6
# Decompressed bytes allowed per entry beyond its content: its header blocks and padding,
# with room for a long name or a few pax records.
_HEADER_ALLOWANCE = 8 * 1024


class BundleError(DockyardError):
    """A bundle that cannot be packed or is refused on unpacking. The message names the
    offending entry, never a path on the node."""

    status = 400
    public_message = None


class BundleTooLarge(BundleError):
    status = 413


class BundleExists(BundleError):
    """`unpack` was given a destination that already exists (nothing was written)."""

    status = 409


# -- pack -----------------------------------------------------------------------------------


def pack(project_dir: Path, config: Config | None = None) -> tuple[bytes, str]:
    """The project as a deterministic tar.gz, and the sha256 hex of those bytes.

    With `config`, the files the node needs to load it (the config file, the main
    module, each container's Dockerfile) are packed even if the ignore file excludes
    them, and the build-context and assets folders exist in the bundle.
    Raises `BundleError` for a symlink that points outside the project.
    """
    root = Path(project_dir).resolve()
    spec = _ignore_spec(root)
    entries = dict(_collect(root, root, spec, set()))
    if config is not None:
        for path in _required_files(config):
            name = _inside(root, path)
            if name is not None and path.is_file():
                entries[name] = path.resolve()
                for parent in PurePosixPath(name).parents:
                    if str(parent) != ".":
                        entries.setdefault(str(parent), None)
        for folder in _required_folders(config):
            name = _inside(root, folder)
            # "." is the project itself (a build context at its root): always there.
            if name is not None and name != "." and folder.is_dir():
                entries.setdefault(name, None)
                for parent in PurePosixPath(name).parents:
                    if str(parent) != ".":
                        entries.setdefault(str(parent), None)
    raw = io.BytesIO()
    # gzip's header holds a time and a file name: both fixed, so equal input gives equal bytes.
    with (
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=_GZIP_LEVEL
        ) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(entries):
            _add(tar, name, entries[name])
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _ignore_spec(root: Path) -> pathspec.PathSpec:
    lines = list(ALWAYS_EXCLUDED)
    ignore = root / IGNORE_FILE
    if ignore.is_file():
        lines += ignore.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    # The always-excluded patterns come last, so no `!` rule in the file brings them back.
    lines += ALWAYS_EXCLUDED
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _collect(
    root: Path, folder: Path, spec: pathspec.PathSpec, active: set[Path]
) -> Iterator[tuple[str, Path | None]]:
    """(archive name, file path or None for a folder) for every entry that is packed."""
    real = folder.resolve()
    if real in active:  # a symlinked folder that contains itself
        raise BundleError(f"{_shown(root, folder)}: symlink loop")
    active = active | {real}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = _shown(root, entry)
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(root):
                raise BundleError(
                    f"{name} is a symlink to {os.readlink(entry)!r}, outside the project: "
                    f"copy the file in or list the link in {IGNORE_FILE}"
                )
            if not target.exists():
                raise BundleError(f"{name} is a broken symlink (to {os.readlink(entry)!r})")
        if entry.is_dir():
            if spec.match_file(name + "/"):
                continue
            yield name, None
            yield from _collect(root, entry, spec, active)
        elif entry.is_file():
            if not spec.match_file(name):
                yield name, entry
        # Sockets, fifos and devices are not project files: left out.


def _shown(root: Path, path: Path) -> str:
    # Relative to the project as reached (through symlinked folders), never resolved.
    return path.relative_to(root).as_posix()


def _inside(root: Path, path: Path) -> str | None:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return None


def _required_files(config: Config) -> list[Path]:
    files = [config.config_path, config.main_path]
    files += [c.dockerfile_path for c in config.containers if c.dockerfile_path is not None]
    return files


def _required_folders(config: Config) -> list[Path]:
    folders = [c.build_context_path for c in config.containers if c.build_context_path]
    if config.assets is not None and config.assets.directory is not None:
        folders.append(config.config_path.parent / config.assets.directory)
    return folders


def _add(tar: tarfile.TarFile, name: str, path: Path | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        mode = os.fstat(file.fileno()).st_mode
        info.size = size
        info.mode = 0o755 if mode & 0o111 else 0o644
        tar.addfile(info, file)


# -- unpack ---------------------------------------------------------------------------------


def unpack(
    source: bytes | Path,
    dest: Path,
    max_bytes: int = MAX_BUNDLE_BYTES,
    *,
    max_files: int = MAX_BUNDLE_FILES,
) -> Path:
    """Extract a bundle (its bytes, or the path of an archive) to the new folder `dest`.

    Refuses (`BundleError`, nothing left behind) absolute names, `..`, links, devices and
    every other special entry, names given twice, more than `max_files` entries, and
    (`BundleTooLarge`) more than `max_bytes` of file content. `dest` must not exist
    (`BundleExists`); its parent is created if needed. Returns `dest`.
    """
    dest = Path(dest)
    if dest.exists():
        raise BundleExists(f"{dest.name} is already unpacked")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            _extract(io.BytesIO(bytes(source)), staging, max_bytes, max_files)
        else:
            with Path(source).open("rb") as file:
                _extract(file, staging, max_bytes, max_files)
        os.chmod(staging, 0o755)
        try:
            staging.rename(dest)
        except OSError as exc:
            if dest.exists():
                raise BundleExists(f"{dest.name} is already unpacked") from None
            raise BundleError(f"cannot store the bundle: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _extract(file: IO[bytes], into: Path, max_bytes: int, max_files: int) -> None:
    total = 0
    seen: set[str] = set()
    # Headers (pax records, long names) are read whole into memory, so what may be
    # decompressed is capped too: the content, plus room for every entry's headers.
    budget = max_bytes + max_files * _HEADER_ALLOWANCE + _CHUNK
    try:
        with (
            gzip.GzipFile(fileobj=file, mode="rb") as unzipped,
            # A stream ("r|"): members are read once, in order, never by seeking.
            tarfile.open(fileobj=cast(IO[bytes], _Capped(unzipped, budget)), mode="r|") as tar,
        ):
            for member in tar:
                name = _checked_name(member.name)
                if name in seen:
                    raise BundleError(f"{name!r} appears twice in the bundle")
                seen.add(name)
                if len(seen) > max_files:
                    raise BundleError(f"the bundle has more than {max_files} entries")
                target = into.joinpath(*PurePosixPath(name).parts)
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise BundleError(
                        f"{name!r} is a {_kind(member)}: bundles hold only files and folders"
                    )
                total += member.size
                if total > max_bytes:
                    raise BundleTooLarge(
                        f"the bundle unpacks to more than {max_bytes} bytes (at {name!r})"
                    )
                _write(tar, member, target)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib_error) as exc:
        raise BundleError(f"not a valid bundle (tar.gz): {exc}") from None
    except (FileExistsError, NotADirectoryError) as exc:
        # A name used both as a file and as a folder ("a" then "a/b").
        raise BundleError(f"conflicting names in the bundle: {exc.strerror}") from None


class _Capped(io.RawIOBase):
    """A reader that refuses (`BundleTooLarge`) to give more than `limit` bytes."""

    def __init__(self, source: gzip.GzipFile, limit: int) -> None:
        self._source = source
        self._left = limit
        self._limit = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        data = self._source.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise BundleTooLarge(f"the bundle decompresses to more than {self._limit} bytes")
        return data


def _checked_name(name: str) -> str:
    path = PurePosixPath(name)
    parts = [part for part in path.parts if part != "."]
    if (
        not name
        or path.is_absolute()
        or "\\" in name
        or "\x00" in name
        or not parts
        or any(part == ".." for part in parts)
    ):
        raise BundleError(f"unsafe name {name!r} in the bundle: only relative paths inside it")
    return "/".join(parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special entry"


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    extracted = tar.extractfile(member)
    if extracted is None:  # pragma: no cover - isreg() members always have data
        raise BundleError(f"{member.name!r} has no content")
    mode = 0o755 if member.mode & 0o111 else 0o644
    # O_EXCL|O_NOFOLLOW: a name is written once, and never through anything but a new file.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        remaining = member.size
        while remaining > 0:
            chunk = extracted.read(min(_CHUNK, remaining))
            if not chunk:
                raise BundleError(f"{member.name!r} is cut short")
            out.write(chunk)
            remaining -= len(chunk)
    os.chmod(target, mode)  # the umask must not decide what the app may execute
