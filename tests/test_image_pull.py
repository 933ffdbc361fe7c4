"""Registry images: a class's `image` naming a registry host is pulled when missing.

The real engine pulls from the real docker-registry binary on 127.0.0.1 (and through the
node's token proxy where credentials matter); nothing reaches a public registry.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.images import ensure_image
from dockyard.containers.pulling import PullProgress, registry_auth, registry_host
from dockyard.containers.runtime import ImagePuller
from dockyard.errors import ImageError
from dockyard.node.registry import Registry
from tests.support.devserver import DevServer
from tests.support.engine import docker_cli
from tests.support.projects import make_project
from tests.support.registry import serving_proxy

needs_registry = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").exists(), reason="needs docker-registry (scripts/setup)"
)

TOKEN = "dy_admin_" + secrets.token_hex(8)


@pytest.fixture(autouse=True)
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A docker CLI config dir of the test's own: no credentials of the machine are read."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    yield directory


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with Registry(tmp_path / "registry") as running:
        yield running


@dataclass(frozen=True)
class Pushed:
    """An image built for this test, pushed, then removed from the engine."""

    repo_ref: str  # host/repo (no tag)
    tag_ref: str  # host/repo:1
    digest_ref: str  # host/repo@sha256:...
    digest: str
    image_id: str
    marker: str  # what its index.html says


async def _build_and_push(
    runtime: DockerRuntime,
    registry: str,
    busybox_image: str,
    labels: dict[str, str],
    tmp_path: Path,
) -> Pushed:
    marker = f"pulled {secrets.token_hex(8)}"
    context = tmp_path / "image"
    context.mkdir()
    (context / "index.html").write_text(marker + "\n")
    # Incompressible, so the engine reports a download in many progress messages.
    (context / "blob").write_bytes(os.urandom(2_500_000))
    (context / "Dockerfile").write_text(
        f"FROM {busybox_image}\n"
        "COPY index.html blob /www/\n"
        "EXPOSE 8080\n"
        'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n'
    )
    local = f"dockyard-test-pull-{secrets.token_hex(4)}:1"
    image_id = await runtime.build_image(
        context, context / "Dockerfile", local, {}, lambda line: None, labels=labels
    )
    repo = f"{registry}/t/p{secrets.token_hex(4)}"
    await runtime.tag(local, f"{repo}:1")
    digest = await runtime.push(f"{repo}:1")
    # Every name goes, so the engine has to fetch the image back from the registry.
    await docker_cli("image", "rm", "-f", image_id)
    assert await runtime.image_id(f"{repo}:1") is None
    return Pushed(repo, f"{repo}:1", f"{repo}@{digest}", digest, image_id, marker)


@pytest_asyncio.fixture
async def pushed(
    registry: Registry,
    docker_runtime: DockerRuntime,
    busybox_image: str,
    test_labels: dict[str, str],
    tmp_path: Path,
) -> Pushed:
    # Removed after the test by test_labels: a pulled image has the built one's labels.
    return await _build_and_push(
        docker_runtime, registry.address, busybox_image, test_labels, tmp_path
    )


async def _ensure(runtime: DockerRuntime, image: str, output: list[str]) -> str:
    return await ensure_image(
        runtime,
        app="pull",
        class_name="Api",
        image=image,
        dockerfile=None,
        context=None,
        build_args={},
        on_output=output.append,
    )


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_docker_runtime_pulls() -> None:
    assert isinstance(DockerRuntime(), ImagePuller)


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_a_missing_registry_image_is_pulled_with_progress_per_layer(
    docker_runtime: DockerRuntime, pushed: Pushed
) -> None:
    output: list[str] = []
    assert await _ensure(docker_runtime, pushed.tag_ref, output) == pushed.image_id
    assert await docker_runtime.image_id(pushed.tag_ref) == pushed.image_id
    host = pushed.tag_ref.split("/")[0]
    assert output[0] == f"Api: pulling {pushed.tag_ref} from the registry at {host}"
    # The busybox layers are on the engine already; only the COPY layer is fetched.
    steps: dict[str, list[str]] = {}
    for line in output:
        if found := re.fullmatch(r"Api: layer ([0-9a-f]{12}): (.+)", line):
            steps.setdefault(found.group(1), []).append(found.group(2))
    fetched = [layer for layer, seen in steps.items() if seen != ["Already exists"]]
    assert len(fetched) == 1 and len(steps) > 1, output
    shown = steps[fetched[0]]
    assert shown[0] == "Pulling fs layer" and shown[-1] == "Pull complete", shown
    assert "Download complete" in shown
    downloads = [step for step in shown if step.startswith("Downloading ")]
    assert downloads, shown
    for step in downloads:
        assert re.fullmatch(r"Downloading \d+(\.\d)? (B|kB|MB) of 2\.\d MB", step), step
    # At most one line per quarter done, however many messages the engine sent.
    assert len(downloads) <= 5 and len(set(downloads)) == len(downloads), downloads
    assert output[-1] == (
        f"Api: pulled {pushed.tag_ref}: digest {pushed.digest}, image {pushed.image_id}"
    )
    # Only step changes are shown, not every progress message of the engine.
    assert len(output) == len(set(output))

    # Present now: the next call neither pulls nor prints.
    output.clear()
    assert await _ensure(docker_runtime, pushed.tag_ref, output) == pushed.image_id
    assert output == []


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_a_digest_reference_is_pulled_and_its_digest_recorded(
    docker_runtime: DockerRuntime, pushed: Pushed
) -> None:
    output: list[str] = []
    assert await _ensure(docker_runtime, pushed.digest_ref, output) == pushed.image_id
    assert output[-1] == (
        f"Api: pulled {pushed.digest_ref}: digest {pushed.digest}, image {pushed.image_id}"
    )
    assert await docker_runtime.image_id(pushed.digest_ref) == pushed.image_id


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_a_from_image_naming_a_registry_is_pulled_before_the_build(
    docker_runtime: DockerRuntime, pushed: Pushed, test_labels: dict[str, str], tmp_path: Path
) -> None:
    context = tmp_path / "from"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {pushed.tag_ref}\nRUN cp /www/index.html /copy\n")
    output: list[str] = []
    tag = await ensure_image(
        docker_runtime,
        app=test_labels["dockyard.app"],
        class_name="Api",
        image="./Dockerfile",
        dockerfile=context / "Dockerfile",
        context=context,
        build_args={},
        on_output=output.append,
    )
    try:
        host = pushed.tag_ref.split("/")[0]
        assert output[0] == f"Api: pulling {pushed.tag_ref} from the registry at {host}"
        pulled = f"Api: pulled {pushed.tag_ref}: digest {pushed.digest}, image {pushed.image_id}"
        assert pulled in output
        # Then the build ran, from the pulled image.
        assert output.index(pulled) < len(output) - 1
        assert await docker_runtime.image_id(pushed.tag_ref) == pushed.image_id
        assert await docker_runtime.image_id(tag) is not None
    finally:
        # Before test_labels removes the pulled image: the engine refuses to remove a
        # parent before its child.
        await docker_cli("image", "rm", tag)


@pytest.mark.docker
async def test_an_unreachable_registry_is_a_clear_error_naming_it(
    docker_runtime: DockerRuntime,
) -> None:
    host = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ImageError) as caught:
        await _ensure(docker_runtime, f"{host}/team/api:1.2", [])
    message = str(caught.value)
    assert f"Could not pull {host}/team/api:1.2 for container class 'Api'" in message
    assert f"the registry at {host} cannot be reached" in message
    assert f"Check that the registry at {host} is running" in message


@pytest.mark.docker
@needs_registry
async def test_a_missing_tag_is_a_clear_error(
    docker_runtime: DockerRuntime, registry: Registry
) -> None:
    ref = f"{registry.address}/team/nothing-here:1.2"
    with pytest.raises(ImageError) as caught:
        await _ensure(docker_runtime, ref, [])
    message = str(caught.value)
    assert f"the registry at {registry.address} has no such image or digest" in message
    assert f"that {ref} was pushed there" in message


@pytest_asyncio.fixture
async def proxy(registry: Registry) -> AsyncIterator[str]:
    """The node's token-checking proxy in front of the registry, on 127.0.0.1."""
    async with serving_proxy(registry, {TOKEN: "admin"}.get) as address:
        yield address


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_credentials_come_from_the_docker_config_and_are_never_printed(
    docker_runtime: DockerRuntime,
    pushed: Pushed,
    proxy: str,
    docker_config: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref = pushed.tag_ref.replace(pushed.tag_ref.split("/")[0], proxy, 1)
    with pytest.raises(ImageError) as caught:
        await _ensure(docker_runtime, ref, [])
    assert f"the registry at {proxy} refused the credentials" in str(caught.value)
    assert f"`docker login {proxy}`" in str(caught.value)

    secret = base64.b64encode(f"x:{TOKEN}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {f"http://{proxy}/v2/": {"auth": secret}}})
    )
    output: list[str] = []
    assert await _ensure(docker_runtime, ref, output) == pushed.image_id
    assert output[0] == (
        f"Api: pulling {ref} from the registry at {proxy} with the credentials of "
        f"`docker login {proxy}`"
    )
    printed = "\n".join(output + [r.getMessage() for r in caplog.records])
    assert TOKEN not in printed and secret not in printed


@pytest.mark.docker
async def test_a_missing_image_without_a_registry_host_is_not_pulled(
    docker_runtime: DockerRuntime,
) -> None:
    output: list[str] = []
    with pytest.raises(ImageError) as caught:
        await _ensure(docker_runtime, "dockyard/not-here:1", output)
    message = str(caught.value)
    assert "never pulls" not in message
    assert "Dockyard pulls only references that name a registry host" in message
    assert output == []


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_dev_pulls_a_registry_image_and_a_bad_one_fails_its_starts_only(
    registry: Registry,
    docker_runtime: DockerRuntime,
    busybox_image: str,
    test_labels: dict[str, str],
    tmp_path: Path,
    docker_config: Path,
) -> None:
    image = await _build_and_push(
        docker_runtime, registry.address, busybox_image, test_labels, tmp_path
    )
    unreachable = f"127.0.0.1:{_closed_port()}"
    project = make_project(
        tmp_path / "project",
        {"Web": {"image": image.tag_ref}, "Echo": {"image": f"{unreachable}/team/echo:1"}},
    )
    try:
        with DevServer(project.root, env={"DOCKER_CONFIG": str(docker_config)}) as dev:
            dev.wait_for(r"Web: layer [0-9a-f]{12}: Pull complete")
            dev.wait_for(re.escape(f"Web: pulled {image.tag_ref}: digest {image.digest}"))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{dev.url}/c/WEB/a/") as response:
                    assert response.status == 200
                    assert await response.text() == image.marker + "\n"
                [info] = await docker_runtime.list(project.labels)
                assert info.image == image.image_id

                for _ in range(2):  # every start fails the same way, as a failed build
                    async with session.get(f"{dev.url}/c/ECHO/x/") as response:
                        text = await response.text()
                        assert response.status == 500
                        match = re.fullmatch(
                            r"Failed to start container: (.+) \(error id (\w+)\)\n", text
                        )
                        assert match, text
                        assert unreachable not in text
                    dev.wait_for(rf"error {match.group(2)}: ")
                    logged = dev.output[dev.output.index(f"error {match.group(2)}: ") :]
                    assert f"the registry at {unreachable} cannot be reached" in logged[:3000]
    finally:
        for info in await docker_runtime.list(project.labels):
            await docker_runtime.remove(info.id)


def test_progress_shows_each_step_once_and_downloads_by_quarter() -> None:
    lines: list[str] = []
    progress = PullProgress(lines.append)
    messages: list[dict[str, Any]] = [
        {"status": "Pulling from team/api", "id": "1.2"},
        {"status": "Already exists", "id": "aaaaaaaaaaaa", "progressDetail": {}},
        {"status": "Pulling fs layer", "id": "bbbbbbbbbbbb", "progressDetail": {}},
        {"status": "Waiting", "id": "bbbbbbbbbbbb", "progressDetail": {}},
        *[
            {
                "status": "Downloading",
                "id": "bbbbbbbbbbbb",
                "progressDetail": {"current": done, "total": 4_000_000},
            }
            for done in range(40_000, 4_000_001, 40_000)
        ],
        {"status": "Download complete", "id": "bbbbbbbbbbbb", "progressDetail": {}},
        {
            "status": "Extracting",
            "id": "bbbbbbbbbbbb",
            "progressDetail": {"current": 512, "total": 900},
        },
        {"status": "Pull complete", "id": "bbbbbbbbbbbb", "progressDetail": {}},
        {"status": "Digest: sha256:" + "c" * 64},
        {"status": "Status: Downloaded newer image for 127.0.0.1:5000/team/api:1.2"},
    ]
    for message in messages:
        progress(message)
    assert lines == [
        "Pulling from team/api",
        "layer aaaaaaaaaaaa: Already exists",
        "layer bbbbbbbbbbbb: Pulling fs layer",
        "layer bbbbbbbbbbbb: Waiting",
        "layer bbbbbbbbbbbb: Downloading 40.0 kB of 4.0 MB",
        "layer bbbbbbbbbbbb: Downloading 1.0 MB of 4.0 MB",
        "layer bbbbbbbbbbbb: Downloading 2.0 MB of 4.0 MB",
        "layer bbbbbbbbbbbb: Downloading 3.0 MB of 4.0 MB",
        "layer bbbbbbbbbbbb: Downloading 4.0 MB of 4.0 MB",
        "layer bbbbbbbbbbbb: Download complete",
        "layer bbbbbbbbbbbb: Extracting 512 B of 900 B",
        "layer bbbbbbbbbbbb: Pull complete",
        "Status: Downloaded newer image for 127.0.0.1:5000/team/api:1.2",
    ]
    assert progress.digest == "sha256:" + "c" * 64


def test_only_references_naming_a_registry_host_have_one() -> None:
    assert registry_host("127.0.0.1:5123/team/api:1.2") == "127.0.0.1:5123"
    assert registry_host("registry.example.com/api@sha256:" + "0" * 64) == "registry.example.com"
    assert registry_host("localhost/api") == "localhost"
    for bare in ("nginx:1.27", "team/api:1.2", "dockyard/busybox:latest", "nginx"):
        assert registry_host(bare) is None, bare


def test_credentials_are_read_as_docker_login_wrote_them(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    assert registry_auth("r.example:5000", config) is None  # no config at all
    encoded = base64.b64encode(b"ann:pa:ss").decode()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://r.example:5000/v1/": {"auth": encoded},
                    "tok.example": {"identitytoken": "t0ken"},
                    "bad.example": {"auth": "not base64!"},
                    "helper.example": {},
                },
                "credHelpers": {"helper.example": "pass"},
            }
        )
    )
    assert registry_auth("r.example:5000", config) == {
        "username": "ann",
        "password": "pa:ss",
        "serveraddress": "r.example:5000",
    }
    assert registry_auth("tok.example", config) == {
        "identitytoken": "t0ken",
        "serveraddress": "tok.example",
    }
    for host in ("r.example", "bad.example", "helper.example", "other.example"):
        assert registry_auth(host, config) is None, host
    config.write_text("{not json")
    assert registry_auth("r.example:5000", config) is None


async def test_a_runtime_that_cannot_pull_says_so() -> None:
    class NoImages:
        """An ImageStore without ImagePuller: the engine has nothing."""

        async def build_image(self, *args: object, **kwargs: object) -> str:
            raise AssertionError("nothing to build")

        async def image_id(self, ref: str) -> str | None:
            return None

    store = NoImages()
    assert not isinstance(store, ImagePuller)
    with pytest.raises(ImageError, match="This container runtime cannot pull images"):
        await ensure_image(
            store,
            app="pull",
            class_name="Api",
            image="127.0.0.1:5123/team/api:1.2",
            dockerfile=None,
            context=None,
            build_args={},
            on_output=print,
        )


@pytest.mark.docker
@needs_registry
@pytest.mark.slow
async def test_deploy_pulls_a_private_image_with_the_docker_login_credentials(
    docker_runtime: DockerRuntime, pushed: Pushed, proxy: str, docker_config: Path
) -> None:
    """`dockyard deploy` of a class whose image is in a registry that wants a login
    pulls it as dev does (with what `docker login` stored), then pushes it to the node."""
    from dockyard.cli.deploy import _build_and_push
    from dockyard.config import load_config
    from dockyard.node.client import NodeClient

    ref = pushed.tag_ref.replace(pushed.tag_ref.split("/")[0], proxy, 1)
    secret = base64.b64encode(f"x:{TOKEN}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {f"http://{proxy}/v2/": {"auth": secret}}})
    )
    project = docker_config.parent / "project"
    project.mkdir()
    (project / "worker.py").write_text(
        "from dockyard import Container\n\n\nclass Api(Container):\n    default_port = 8080\n"
    )
    (project / "wrangler.jsonc").write_text(
        json.dumps(
            {
                "name": "pulled",
                "main": "worker.py",
                "containers": [{"class_name": "Api", "image": ref}],
                "durable_objects": {"bindings": [{"name": "API", "class_name": "Api"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Api"]}],
            }
        )
    )
    config = load_config(project)
    # The same token-checking registry stands for the node's own.
    begun = {"registry": proxy, "deploy_id": "d1", "repositories": {"Api": "pulled/api"}}
    async with NodeClient(f"http://{proxy}", TOKEN) as client:
        digests = await _build_and_push(config, begun, client)
    assert digests["Api"].startswith("sha256:")
    assert await docker_runtime.image_id(ref) == pushed.image_id
