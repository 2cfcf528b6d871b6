"""The Dockerfile, without a Docker engine.

What is tested: the build stage's own instructions (ENV, WORKDIR, COPY, RUN) are read from
the Dockerfile and carried out in a temporary directory standing in for the image's root,
with this machine's Python 3.11 standing in for the base image's; the virtualenv they make
must run `bbr serve --help`, `bbr validate config/model-map.yaml` and `bbr --version`, hold
bbr as an installed package (not this checkout), and have no pip left. The rest of the file
is checked as text: an exact base image tag, dependencies installed in their own layer before
the source is copied, binary wheels only, a runtime stage that copies the virtualenv and runs
as uid 65532 with `bbr serve` as its entrypoint and the chart's ports exposed, and a
.dockerignore that keeps everything but the sources out of the build context.

What is not tested: `docker build` itself (BuildKit cache mounts, the base image's contents,
the final image's layers and size) and running the built image.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bbr import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CHART_VALUES = REPO_ROOT / "charts" / "body-based-routing" / "values.yaml"


@dataclass
class Instruction:
    keyword: str
    flags: list[str]
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> Iterator[Instruction]:
    """Dockerfile instructions: comments dropped, continuation lines joined."""
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.strip().partition(" ")
        flags = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        yield Instruction(keyword.upper(), flags, rest)
        logical = ""


def substitute(text: str, env: dict[str, str]) -> str:
    """$VAR and ${VAR} as Docker expands them in ENV, WORKDIR, COPY and FROM."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def stages() -> list[Stage]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "ARG" and not found:
            arg, _, default = instruction.args.partition("=")
            args[arg] = default
        elif instruction.keyword == "FROM":
            words = substitute(instruction.args, args).split()
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], stage))
        else:
            assert found, f"{instruction.keyword} before FROM"
            found[-1].instructions.append(instruction)
    return found


# --- the Dockerfile as text ---------------------------------------------------------------------


def test_base_image_is_pinned() -> None:
    all_stages = stages()
    assert len(all_stages) == 2
    bases = {stage.base for stage in all_stages}
    (base,) = bases  # build and runtime on the same base: the venv's python links match
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_dependencies_get_their_own_layer_before_the_source() -> None:
    build = stages()[0]
    steps = [(i.keyword, i.args) for i in build.instructions if i.keyword in {"COPY", "RUN"}]
    copies = [n for n, (keyword, _) in enumerate(steps) if keyword == "COPY"]
    first_copy, source_copy = steps[copies[0]], steps[copies[-1]]
    assert first_copy[1].split()[0] == "pyproject.toml" and len(first_copy[1].split()) == 2
    assert source_copy[1].split()[0] == "bbr/"
    dependency_run = steps[copies[0] + 1]
    assert dependency_run[0] == "RUN" and "--requirement requirements.txt" in dependency_run[1]
    assert copies[0] + 1 < copies[-1]
    for keyword, args in steps:
        if keyword == "RUN" and "pip install" in args:
            # No source builds, so no compiler is ever needed.
            assert "--only-binary=:all:" in args or "--no-deps ." in args, args
    text = DOCKERFILE.read_text()
    assert not re.search(r"apt-get|apk add|gcc|build-essential", text)


def test_runtime_stage_is_small_and_unprivileged() -> None:
    runtime = stages()[-1]
    assert not runtime.of("RUN"), "the runtime stage installs nothing"
    (copy,) = runtime.of("COPY")
    assert copy.flags == ["--from=build"]
    assert copy.args.split() == ["/opt/bbr", "/opt/bbr"]
    (user,) = runtime.of("USER")
    assert user.args.split(":") == ["65532", "65532"]
    (entrypoint,) = runtime.of("ENTRYPOINT")
    assert json.loads(entrypoint.args) == ["bbr", "serve"]
    (cmd,) = runtime.of("CMD")
    assert json.loads(cmd.args) == ["--kubernetes"]
    (expose,) = runtime.of("EXPOSE")
    assert sorted(int(port) for port in expose.args.split()) == [9004, 9005, 9090]


def test_image_and_chart_agree() -> None:
    runtime = stages()[-1]
    values = yaml.safe_load(CHART_VALUES.read_text())["bbr"]
    (user,) = runtime.of("USER")
    assert int(user.args.split(":")[0]) == values["podSecurityContext"]["runAsUser"]
    assert int(user.args.split(":")[1]) == values["podSecurityContext"]["runAsGroup"]
    (expose,) = runtime.of("EXPOSE")
    ports = {int(port) for port in expose.args.split()}
    assert ports == {values["port"], values["healthCheckPort"], values["metricsPort"]}


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    verdict = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatch(parts[-1], pattern[3:])
        ):
            verdict = not negate
    return verdict


def test_build_context_is_the_sources_only() -> None:
    for path in ("pyproject.toml", "README.md", "bbr/cli.py", "bbr/sources/kubernetes.py"):
        assert not ignored(path), path
    for path in (".venv/bin/python", ".git/config", "tests/test_chart.py", "bbr/__pycache__/x.pyc"):
        assert ignored(path), path
    # Everything the build stage copies is in the context.
    for copy in stages()[0].of("COPY"):
        for source in copy.args.split()[:-1]:
            assert (REPO_ROOT / source).exists() and not ignored(source.rstrip("/")), source


# --- the build stage, carried out -----------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory standing in for the image's root after the build stage's steps."""
    root = tmp_path_factory.mktemp("image")
    build = stages()[0]

    def inside(text: str) -> str:
        """Container paths (/opt/..., /src) moved under `root`."""
        return re.sub(r"(?<![\w./-])/(opt|src|tmp)\b", lambda m: f"{root}/{m.group(1)}", text)

    # This machine's environment (pip's index, proxies, certificates), less anything that
    # would point Python at this checkout or its virtualenv; this Python first on PATH.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTHON", "VIRTUAL_ENV", "BBR_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cwd = root
    for step in build.instructions:
        if step.keyword == "ENV":
            for pair in shlex.split(step.args):
                name, _, value = pair.partition("=")
                env[name] = inside(substitute(value, env))
        elif step.keyword == "WORKDIR":
            cwd = Path(inside(substitute(step.args, env)))
            cwd.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            # Docker's rules: a directory's contents go into dest; a file goes into dest/
            # when dest ends with a slash.
            assert not step.flags, "the build stage copies from the context only"
            *sources, dest = step.args.split()
            target = Path(inside(dest)) if dest.startswith("/") else cwd / dest
            for source in sources:
                origin = REPO_ROOT / source
                if origin.is_dir():
                    shutil.copytree(
                        origin,
                        target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True,
                    )
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
        elif step.keyword == "RUN":
            # --mount=type=cache only speeds up docker builds; here pip uses its own cache.
            command = inside(step.args)
            result = subprocess.run(
                ["sh", "-ec", command],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert result.returncode == 0, f"RUN {step.args}\n{result.stdout}\n{result.stderr}"
        else:
            raise AssertionError(f"build stage instruction not understood here: {step.keyword}")
    return root


def run_in_image(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a program of the image's virtualenv from its working directory (/tmp)."""
    venv_bin = root / "opt" / "bbr" / "bin"
    workdir = root / "tmp"
    workdir.mkdir(exist_ok=True)
    env = {
        "PATH": f"{venv_bin}{os.pathsep}/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [str(venv_bin / args[0]), *args[1:]],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(420)
def test_image_venv_runs_bbr(image_root: Path) -> None:
    help_text = run_in_image(image_root, "bbr", "serve", "--help")
    assert help_text.returncode == 0, help_text.stderr
    for flag in ("--kubernetes", "--namespace", "--grpc-port", "--streaming", "--max-body-bytes"):
        assert flag in help_text.stdout

    version = run_in_image(image_root, "bbr", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"bbr {__version__}"

    model_map = REPO_ROOT / "config" / "model-map.yaml"
    validate = run_in_image(image_root, "bbr", "validate", str(model_map))
    assert validate.returncode == 0, validate.stdout + validate.stderr
    for model in ("food-review-1", "meta-llama/Llama-3.1-8B-Instruct", "ski-resorts"):
        assert model in validate.stdout


@pytest.mark.timeout(420)
def test_image_venv_holds_an_installed_bbr_and_no_pip(image_root: Path) -> None:
    venv = image_root / "opt" / "bbr"
    where = run_in_image(image_root, "python", "-c", "import bbr; print(bbr.__file__)")
    assert where.returncode == 0, where.stderr
    # Not this checkout: the copy installed in the virtualenv's site-packages.
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    assert not (venv / "bin" / "pip").exists()
    pip = run_in_image(image_root, "python", "-m", "pip", "--version")
    assert pip.returncode != 0
