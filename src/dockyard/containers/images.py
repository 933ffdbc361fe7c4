"""Images for container classes: build from a Dockerfile only when its inputs changed,
or pull a reference that names a registry when the engine does not have it.

The tag of a built image is a hash of everything that goes into the build (the
Dockerfile, the build args and the exact files sent as context), so an unchanged
project starts from the image it already has, and any change produces a new tag.
Pulling (which references, credentials, progress) is `pulling.py`'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from dockyard.containers.pulling import pull_image, registry_host
from dockyard.containers.runtime import ImagePuller, ImageStore
from dockyard.errors import ImageError

# Dockyard's own state, VCS metadata and Python caches never belong in a build context;
# leaving them out keeps builds small and the content hash stable.
ALWAYS_EXCLUDED = frozenset({".dockyard", ".git", "__pycache__", ".venv"})


def context_files(context: Path) -> list[tuple[str, Path]]:
    """The files sent as build context, as (archive name, path), sorted by name.

    Skips `ALWAYS_EXCLUDED` directories and whatever `.dockerignore` excludes.
    """
    ignore = _DockerIgnore.load(context / ".dockerignore")
    found: list[tuple[str, Path]] = []
    for path in _walk(context):
        name = path.relative_to(context).as_posix()
        if not ignore.excludes(name):
            found.append((name, path))
    found.sort()
    return found


def context_archive(context_dir: Path, dockerfile: Path) -> tuple[io.BytesIO, str]:
    """A tar of `context_files(context_dir)`, plus the Dockerfile's name inside it."""
    if not dockerfile.is_absolute():
        dockerfile = context_dir / dockerfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in context_files(context_dir):
            tar.add(path, arcname=name, recursive=False)
        try:
            dockerfile_name = dockerfile.resolve().relative_to(context_dir.resolve()).as_posix()
        except ValueError:
            dockerfile_name = ""
        # A Dockerfile outside the context (or one .dockerignore hides) still has to travel.
        if not dockerfile_name or dockerfile_name not in tar.getnames():
            dockerfile_name = ".dockyard.Dockerfile"
            tar.add(dockerfile, arcname=dockerfile_name)
    buffer.seek(0)
    return buffer, dockerfile_name


def _walk(directory: Path) -> Iterator[Path]:
    for entry in sorted(directory.iterdir()):
        if entry.name in ALWAYS_EXCLUDED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            yield entry
            yield from _walk(entry)
        else:
            yield entry


class _DockerIgnore:
    """The common subset of `.dockerignore`: `*`, `?`, `**`, `!` exceptions, comments.

    A path is excluded when it or one of its parent directories matches the last
    matching pattern, and that pattern is not an exception.
    """

    def __init__(self, rules: list[tuple[re.Pattern[str], bool]]) -> None:
        self._rules = rules

    @classmethod
    def load(cls, path: Path) -> _DockerIgnore:
        rules: list[tuple[re.Pattern[str], bool]] = []
        if path.is_file():
            for raw in path.read_text(errors="replace").splitlines():
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                keep = line.startswith("!")
                pattern = line[1:].strip() if keep else line
                pattern = pattern.strip("/")
                if pattern.startswith("./"):
                    pattern = pattern[2:]
                if pattern:
                    rules.append((_glob_to_regex(pattern), keep))
        return cls(rules)

    def excludes(self, name: str) -> bool:
        parts = name.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for regex, keep in self._rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not keep
        return excluded


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def content_hash(dockerfile: Path, context: Path, build_args: Mapping[str, str]) -> str:
    """SHA-256 over the Dockerfile, the build args and each context file's name, mode
    and bytes (a symlink counts by its target string)."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        # Length-prefixed fields, so no two different inputs feed the same byte stream.
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    add("dockerfile", dockerfile.read_bytes())
    for key in sorted(build_args):
        add("arg", f"{key}={build_args[key]}".encode())
    for name, path in context_files(context):
        info = path.lstat()
        add("path", name.encode())
        add("mode", oct(stat.S_IMODE(info.st_mode) | stat.S_IFMT(info.st_mode)).encode())
        if stat.S_ISLNK(info.st_mode):
            add("link", str(path.readlink()).encode())
        elif stat.S_ISREG(info.st_mode):
            add("bytes", path.read_bytes())
    return digest.hexdigest()


def _checked_hash(
    class_name: str, dockerfile: Path, context: Path, build_args: Mapping[str, str]
) -> str:
    if not dockerfile.is_file():
        raise ImageError(f"Dockerfile {dockerfile} for container class {class_name!r} not found")
    if not context.is_dir():
        raise ImageError(f"Build context {context} for class {class_name!r} is not a directory")
    return content_hash(dockerfile, context, build_args)


_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE)
_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", re.IGNORECASE)
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def base_images(dockerfile_text: str, build_args: Mapping[str, str]) -> list[str]:
    """The external images a Dockerfile builds FROM (not `scratch`, not earlier stages).

    `ARG`s declared before the first FROM are substituted (build args win); a reference
    that still contains an unresolved variable is left out.
    """
    args: dict[str, str] = {}
    stages: set[str] = set()
    found: list[str] = []
    seen_from = False
    for line in dockerfile_text.splitlines():
        if not seen_from and (arg := _ARG.match(line)):
            args[arg.group(1)] = build_args.get(arg.group(1), (arg.group(2) or "").strip("\"'"))
            continue
        match = _FROM.match(line)
        if match is None:
            continue
        seen_from = True
        ref = _VAR.sub(lambda m: args.get(m.group(1), m.group(0)), match.group(1))
        external = "$" not in ref and ref.lower() != "scratch" and ref.lower() not in stages
        if external and ref not in found:
            found.append(ref)
        if match.group(2):
            stages.add(match.group(2).lower())
    return found


def _why_not_pulled(ref: str) -> str:
    if registry_host(ref) is not None:
        return "This container runtime cannot pull images."
    return (
        "Dockyard pulls only references that name a registry host (such as "
        "`registry.example.com/team/api:1.2`) and never reaches Docker Hub by itself."
    )


def image_tag(app: str, class_name: str, digest: str) -> str:
    """`dockyard-<app>-<class>:<hash[:12]>`, lowercased to a valid image reference."""
    repo = re.sub(r"[^a-z0-9._-]+", "-", f"dockyard-{app}-{class_name}".lower()).strip("-._")
    return f"{repo}:{digest[:12]}"


async def ensure_image(
    runtime: ImageStore,
    *,
    app: str,
    class_name: str,
    image: str,
    dockerfile: Path | None,
    context: Path | None,
    build_args: Mapping[str, str],
    on_output: Callable[[str], None],
) -> str:
    """Return the image reference to run for a container class.

    With a `dockerfile`, build it (context defaults to the Dockerfile's directory) unless
    an image for exactly these inputs exists already. Without one, `image` is an image
    reference; when the engine does not have it and it names a registry host, it is
    pulled (when `runtime` is an `ImagePuller`), with progress on `on_output`. As with
    ``docker run``, an image present is used as it is, even if its tag moved since.
    """

    def output(line: str) -> None:
        on_output(f"{class_name}: {line}")

    if dockerfile is None:
        image_id = await runtime.image_id(image)
        if image_id is None:
            if registry_host(image) is None or not isinstance(runtime, ImagePuller):
                raise ImageError(
                    f"Image {image!r} for container class {class_name!r} is not present on "
                    f"the container engine. {_why_not_pulled(image)} Build or load it first "
                    f"(for example `docker build -t {image} .`), name its registry in `image`, "
                    "or point `image` at a Dockerfile."
                )
            image_id = await pull_image(
                runtime, image, what=f"container class {class_name!r}", on_output=output
            )
        # Run exactly the image checked here: a tag like :latest may move, and the
        # id makes the containers' version label (and their adoption) follow the image.
        return image_id

    context_dir = context if context is not None else dockerfile.parent
    # Reading every context file is blocking disk work; keep it off the event loop.
    digest = await asyncio.to_thread(_checked_hash, class_name, dockerfile, context_dir, build_args)
    tag = image_tag(app, class_name, digest)
    if await runtime.image_id(tag) is not None:
        return tag
    # The engine's builder would try a registry for a missing FROM image; say what is
    # missing instead of waiting for a pull that cannot work here.
    for base in base_images(await asyncio.to_thread(dockerfile.read_text), build_args):
        if await runtime.image_id(base) is not None:
            continue
        if registry_host(base) is None or not isinstance(runtime, ImagePuller):
            raise ImageError(
                f"{dockerfile} (class {class_name!r}) starts FROM {base!r}, which is not "
                f"present on the container engine. {_why_not_pulled(base)} Build or load "
                "that image first, name its registry in FROM, or pass a build arg pointing "
                "FROM at a local image."
            )
        await pull_image(
            runtime, base, what=f"FROM in {dockerfile} (class {class_name!r})", on_output=output
        )
    await runtime.build_image(
        context_dir,
        dockerfile,
        tag,
        build_args,
        on_output,
        labels={"dockyard.app": app, "dockyard.class": class_name, "dockyard.hash": digest},
    )
    return tag
