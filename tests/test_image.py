"""The Dockerfile, built with podman and run the way the chart runs it.

`make image-tools` (scripts/image.sh) installs Debian's podman and makes a Debian bookworm
python3 base image with mmdebstrap, standing in for python:3.11-slim-bookworm (no container
registry here). The test builds the real Dockerfile on it (`--build-arg PYTHON_IMAGE`) from
a copy of the checkout's tracked files (what a clean clone holds), then runs the image with
what `helm template` renders for the chart's Deployment: its args (the ConfigMap watch
replaced by the chart's own model ConfigMaps in a mounted file), its securityContext
(read-only root, every capability dropped, uid/gid 65532, no privilege escalation, the
runtime's default seccomp profile), its /tmp volume, env, ports and resources. Asserted:
health SERVING, every model of the chart's `models:` routes over a real ext_proc stream,
/metrics counts them, SIGTERM exits 0 promptly, and the process really runs under those
restrictions; with bbr.workers=2 too (its metrics files must fit in the /tmp volume). A
separate build shows what the .dockerignore lets into the build context.

Not covered here: the pinned python:3.11-slim-bookworm base itself (its tag is checked as
text), docker/BuildKit (podman's buildah runs the same Dockerfile, cache mounts included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bbr import __version__
from bbr.health import SERVICE_NAME
from harness.processes import REPO_ROOT, poll_until
from tests.chart import MODELS, NAMESPACE, render
from tests.support import BASE_HEADER, CHANNEL_OPTIONS, MODEL_HEADER, metric_value, route

DOCKERFILE = REPO_ROOT / "Dockerfile"
IMAGE_SCRIPT = REPO_ROOT / "scripts" / "image.sh"
PREFIX = f"bbr-image-test-{os.getpid()}"
MODEL_DIR = "/etc/bbr/models"
TOOLS_HINT = "run `make image-tools` (Debian's podman, buildah, mmdebstrap; needs root)"

pytestmark = pytest.mark.timeout(900)


# --- podman -------------------------------------------------------------------------------


def podman_binary() -> str:
    found = shutil.which("podman")
    if not found:
        pytest.fail(f"podman not found: {TOOLS_HINT}")
    return found


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [podman_binary(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def machine_flags() -> list[str]:
    """The OCI runtime and ulimits this machine needs (scripts/image.sh detects them)."""
    podman_binary()
    result = subprocess.run(
        [str(IMAGE_SCRIPT), "flags"], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.split()


def tracked_tree(dest: Path) -> Path:
    """The checkout's tracked files, as they are now: what a clean clone's build would see."""
    listing = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if listing.returncode != 0:  # not a git checkout (a release tarball): use it as it is
        return REPO_ROOT
    for name in listing.stdout.decode().split("\0"):
        source = REPO_ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def build(context: Path, tag: str) -> None:
    result = subprocess.run(
        [str(IMAGE_SCRIPT), "build", str(context), tag],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    if result.returncode != 0 and "make image-tools" in result.stderr:
        pytest.fail(f"{result.stderr.strip()} ({TOOLS_HINT})")
    assert result.returncode == 0, result.stderr[-4000:]


def remove_stale() -> None:
    """Containers and tags of earlier runs that were killed before their own cleanup."""
    names = podman("ps", "--all", "--format", "{{.Names}}", "--filter", "name=^bbr-image-test-")
    tags = podman("images", "--format", "{{.Repository}}", "--filter=reference=*bbr-image-test-*")
    for kind, listing in (("container", names.stdout), ("image", tags.stdout)):
        for name in set(listing.split()):
            match = re.search(r"bbr-image-test-(\d+)", name)
            if match and not Path(f"/proc/{match[1]}").exists():
                podman(kind, "rm", "--force", name)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    podman_binary()
    remove_stale()
    tag = f"localhost/{PREFIX}:latest"
    build(tracked_tree(tmp_path_factory.mktemp("clone")), tag)
    yield tag
    # The tag only: the layers stay as the next build's cache.
    podman("rmi", "--force", tag)


def inspect(image: str) -> dict[str, Any]:
    result = podman("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)[0]["Config"]
    return config


# --- the chart's Deployment, as podman flags ----------------------------------------------


def mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"quantity not understood here: {quantity}"
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


def security_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The pod's and container's securityContext as podman flags (the container's wins).

    A field not translated here fails the test: a new restriction in the chart must be
    tried against the image, not skipped.
    """
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})
    unknown = set(pod_sc) - {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
    unknown |= set(sc) - {
        "allowPrivilegeEscalation",
        "readOnlyRootFilesystem",
        "runAsNonRoot",
        "runAsUser",
        "runAsGroup",
        "capabilities",
        "seccompProfile",
    }
    assert not unknown, f"securityContext fields not translated to podman: {sorted(unknown)}"
    merged = {**pod_sc, **sc}
    flags: list[str] = []
    if "runAsUser" in merged:
        user = str(merged["runAsUser"])
        if "runAsGroup" in merged:
            user += f":{merged['runAsGroup']}"
        flags += ["--user", user]
    if "fsGroup" in pod_sc:
        flags += ["--group-add", str(pod_sc["fsGroup"])]
    seccomp = merged.get("seccompProfile", {"type": "RuntimeDefault"})
    assert seccomp == {"type": "RuntimeDefault"}, seccomp  # podman's default profile
    if merged.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if merged.get("readOnlyRootFilesystem"):
        # Nothing writable but the volumes: no tmpfs of podman's own on /tmp, /run, /var/tmp.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = merged.get("capabilities", {})
    assert set(capabilities) <= {"drop", "add"}, capabilities
    flags += [f"--cap-drop={cap}" for cap in capabilities.get("drop", [])]
    flags += [f"--cap-add={cap}" for cap in capabilities.get("add", [])]
    return flags


def run_flags(deployment: dict[str, Any], model_dir: Path) -> tuple[list[str], list[str]]:
    """(podman run flags, bbr args) for the rendered Deployment's one container."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    flags = security_flags(pod, container)
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"volume not translated: {volume}"
        size = volume["emptyDir"].get("sizeLimit")
        options = f"rw,mode=1777{f',size={mebibytes(size)}m' if size else ''}"
        flags += ["--tmpfs", f"{mount['mountPath']}:{options}"]
    for env in container.get("env", []):
        if "value" in env:
            flags += ["--env", f"{env['name']}={env['value']}"]
        else:
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, env
            flags += ["--env", f"{env['name']}={NAMESPACE}"]
    for port in container["ports"]:
        flags += ["--publish", f"127.0.0.1::{port['containerPort']}/{port['protocol'].lower()}"]
    resources = container.get("resources", {})
    if "memory" in resources.get("limits", {}):
        flags += ["--memory", f"{mebibytes(resources['limits']['memory'])}m"]
    # What a ConfigMap volume is: a read-only directory of files.
    flags += ["--volume", f"{model_dir}:{MODEL_DIR}:ro"]
    # The ConfigMap watch needs an API server; the same ConfigMaps come from the file.
    assert "--kubernetes" in container["args"], container["args"]
    args = [a for a in container["args"] if a != "--kubernetes" and not a.startswith("--namespace")]
    return flags, [*args, f"--model-map={MODEL_DIR}"]


class Container:
    """The image running as the chart's Deployment would run it."""

    def __init__(
        self, image: str, tmp: Path, name: str, values: dict[str, Any] | None = None
    ) -> None:
        manifests = render({"models": MODELS, **(values or {})})
        (self.deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
        # The chart's own model ConfigMaps, readable by uid 65532 (ConfigMap volume mode 0644).
        model_dir = tmp / "models"
        model_dir.mkdir()
        configmaps = [m for m in manifests if m["kind"] == "ConfigMap"]
        assert len(configmaps) == len(MODELS)
        (model_dir / "models.yaml").write_text(yaml.safe_dump_all(configmaps))
        model_dir.chmod(0o755)
        (model_dir / "models.yaml").chmod(0o644)
        self.name = f"{PREFIX}-{name}"
        flags, args = run_flags(self.deployment, model_dir)
        podman("rm", "--force", "--time=0", self.name)
        started = podman(
            "run", "--detach", "--pull=never", f"--name={self.name}", *machine_flags(), *flags,
            image, *args,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        ports = podman("port", self.name)
        assert ports.returncode == 0, ports.stderr
        # "9004/tcp -> 127.0.0.1:40123"
        self.ports = {
            int(inner.split("/")[0]): int(outer.rsplit(":", 1)[1])
            for inner, outer in (line.split(" -> ") for line in ports.stdout.splitlines())
        }
        values = yaml.safe_load((REPO_ROOT / "charts/body-based-routing/values.yaml").read_text())
        self.grpc_port = self.ports[values["bbr"]["port"]]
        self.health_port = self.ports[values["bbr"]["healthCheckPort"]]
        self.metrics_port = self.ports[values["bbr"]["metricsPort"]]

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def state(self) -> dict[str, Any]:
        result = podman("inspect", "--format", "{{json .State}}", self.name)
        assert result.returncode == 0, result.stderr
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            status: int = reply.status
            return status

    def serving(self) -> bool:
        assert self.state()["Running"], f"the container exited:\n{self.logs()}"
        serving: int = health_pb2.HealthCheckResponse.SERVING
        with contextlib.suppress(grpc.RpcError):
            return self.health() == serving
        return False

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=CHANNEL_OPTIONS)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text

    def exec_python(self, code: str) -> Any:
        """Run `code` in the container (as its user, under its restrictions); its JSON output."""
        result = podman("exec", self.name, "python", "-c", code, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def remove(self) -> None:
        podman("rm", "--force", "--time=0", self.name)


@pytest.fixture(scope="module")
def chart_container(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    container = Container(image, tmp_path_factory.mktemp("chart"), "chart")
    try:
        took = poll_until(container.serving, timeout=60, interval=0.2)
        assert took is not None, f"not SERVING within 60 s:\n{container.logs()}"
        yield container
    finally:
        container.remove()


# --- the image ----------------------------------------------------------------------------


def test_base_image_is_pinned() -> None:
    """The default base is an exact python tag (the test builds on a stand-in of it)."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the Dockerfile takes its base as ARG PYTHON_IMAGE"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", match[1])
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], froms


def test_image_config_matches_the_chart(image: str) -> None:
    config = inspect(image)
    # Numeric and non-root, so runAsNonRoot holds even where runAsUser is not set.
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["bbr", "serve"]
    assert config["Cmd"] == ["--kubernetes"]
    (deployment,) = [m for m in render() if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    chart_ports = {f"{p['containerPort']}/{p['protocol'].lower()}" for p in container["ports"]}
    assert set(config["ExposedPorts"]) == chart_ports


def test_image_holds_an_installed_bbr_and_no_pip(image: str) -> None:
    code = (
        "import importlib.metadata as m, importlib.util as u, json, bbr; "
        "print(json.dumps([bbr.__file__, m.version('bbr'), u.find_spec('pip') is None]))"
    )
    result = podman(
        "run", "--rm", "--pull=never", *machine_flags(), "--entrypoint=python", image, "-c", code
    )
    assert result.returncode == 0, result.stderr
    where, version, no_pip = json.loads(result.stdout)
    assert where.startswith("/opt/bbr/lib/") and "site-packages" in where
    assert version == __version__
    assert no_pip
    version_line = podman(
        "run", "--rm", "--pull=never", *machine_flags(), "--entrypoint=bbr", image, "--version"
    )
    assert version_line.stdout.strip() == f"bbr {__version__}", version_line.stderr


def test_build_context_is_the_sources_only(tmp_path: Path) -> None:
    """This working tree (its .git, .venv, tests, caches) through the .dockerignore."""
    probe = tmp_path / "Containerfile"
    probe.write_text("FROM scratch\nCOPY . /context/\n")
    tag = f"localhost/{PREFIX}-context:latest"
    built = podman(
        "build", *machine_flags(), "--file", str(probe), "--tag", tag, str(REPO_ROOT), timeout=300
    )
    assert built.returncode == 0, built.stderr
    try:
        mounted = podman("image", "mount", tag)
        assert mounted.returncode == 0, mounted.stderr
        root = Path(mounted.stdout.strip()) / "context"
        found = {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}
    finally:
        podman("image", "unmount", tag)
        podman("rmi", "--force", tag)
    outside = {p for p in found if p not in {"pyproject.toml", "README.md"} and p[:4] != "bbr/"}
    assert not outside, sorted(outside)
    assert not {p for p in found if "__pycache__" in p or p.endswith(".pyc")}
    sources = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "bbr").rglob("*.py")}
    assert sources <= found


# --- the image as the chart runs it -------------------------------------------------------


def test_health_is_serving(chart_container: Container) -> None:
    for service in ("", SERVICE_NAME):
        assert chart_container.health(service) == health_pb2.HealthCheckResponse.SERVING


def test_every_model_of_the_chart_routes(chart_container: Container) -> None:
    with chart_container.channel() as channel:
        for model in MODELS:
            for name in [model["baseModel"], *model.get("adapters", [])]:
                headers = route(channel, name)
                assert headers.get(BASE_HEADER) == model["baseModel"], (name, headers)
                assert headers.get(MODEL_HEADER) == name
        unknown = route(channel, "no-such-model")
        assert BASE_HEADER not in unknown and unknown.get(MODEL_HEADER) == "no-such-model"


def test_metrics_answer(chart_container: Container) -> None:
    with chart_container.channel() as channel:
        assert route(channel, "food-review-1").get(BASE_HEADER) == MODELS[0]["baseModel"]
    text = chart_container.metrics()
    routed = metric_value(text, "bbr_requests_total", outcome="routed")
    assert routed is not None and routed >= 1, text
    assert metric_value(text, "bbr_info", version=__version__) == 1


def test_runs_under_the_chart_restrictions(chart_container: Container) -> None:
    """The process is what the securityContext asks for; bbr needs nothing more."""
    facts = chart_container.exec_python(
        "import json, os\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/1/status').read().splitlines())\n"
        "def writable(path):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "    return 0\n"
        "def memory_limit():\n"
        "    for path in ('/sys/fs/cgroup/memory.max',\n"
        "                 '/sys/fs/cgroup/memory/memory.limit_in_bytes'):\n"
        "        try:\n"
        "            return open(path).read().strip()\n"
        "        except OSError:\n"
        "            pass\n"
        "print(json.dumps({'status': status, 'root': writable('/opt/bbr/probe'),\n"
        "                  'tmp': writable('/tmp/probe'), 'memory': memory_limit()}))"
    )
    status = facts["status"]
    assert status["Uid"].split()[:2] == ["65532", "65532"]  # real, effective
    assert status["Gid"].split()[:2] == ["65532", "65532"]
    assert "65532" in status["Groups"].split()  # fsGroup
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a filter: the runtime's default profile
    assert facts["root"] == 30  # EROFS: the root filesystem is read-only
    assert facts["tmp"] == 0  # the chart's emptyDir
    (container,) = chart_container.deployment["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert facts["memory"] == str(mebibytes(limit) * 2**20)


def test_workers_share_the_read_only_root(image: str, tmp_path: Path) -> None:
    """bbr.workers > 1 keeps its metrics files in the chart's /tmp volume, nowhere else."""
    container = Container(image, tmp_path, "workers", {"bbr": {"workers": 2}})
    try:
        took = poll_until(container.serving, timeout=60, interval=0.2)
        assert took is not None, f"not SERVING within 60 s:\n{container.logs()}"
        # Four connections, spread over the workers by the kernel; /metrics counts them all.
        for _ in range(4):
            with container.channel() as channel:
                assert route(channel, "ski-resorts").get(BASE_HEADER) == MODELS[1]["baseModel"]
        routed = metric_value(container.metrics(), "bbr_requests_total", outcome="routed")
        assert routed == 4
    finally:
        container.remove()


def test_sigterm_exits_zero_promptly(chart_container: Container) -> None:
    """What the kubelet does at pod deletion; last, since the container is gone after it."""
    started = time.monotonic()
    killed = podman("kill", f"--signal={signal.SIGTERM.name}", chart_container.name)
    assert killed.returncode == 0, killed.stderr
    waited = podman("wait", chart_container.name, timeout=30)
    took = time.monotonic() - started
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "0", chart_container.logs()
    assert took < 10, took  # no open streams: nothing to drain
    assert "Traceback" not in chart_container.logs()
