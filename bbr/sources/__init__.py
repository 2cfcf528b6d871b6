"""Where model maps come from: files (`files`) and the Kubernetes API (`kubernetes`,
over the client in `kubeclient`), each feeding one `MapHolder`.

`build` makes the sources the flags ask for. Every load or reload of every source is
reported one way, `report`: each problem logged in one shape, the reload counter bumped
once; each warning is logged one way too, `warn`. The sources only produce
`LoadReport`s; whoever builds them decides whether they are reported (with `--workers`,
the workers report and the supervisor does not).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bbr import metrics
from bbr.logs import fields
from bbr.modelmap import ConfigMapError, MapFileError, MapHolder

log = logging.getLogger("bbr.sources")


@dataclass(slots=True)
class LoadReport:
    """One load or reload of a source: what changed and what went wrong."""

    changed: bool = False
    file_errors: list[MapFileError] = field(default_factory=list)
    errors: list[ConfigMapError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.file_errors and not self.errors


def report(load: LoadReport, *, at_start: bool = False) -> None:
    """Log each problem of `load` and count it once in `bbr_model_map_reloads_total`.

    `at_start`: the first load of the files, where an invalid ConfigMap is skipped
    (there is no last good version to keep yet).
    """
    for problem in load.file_errors:
        log.error(
            "model map file not loaded; the map in force stays",
            extra=fields(path=problem.path, line=problem.line, reason=problem.reason),
        )
    message = (
        "ConfigMap skipped"
        if at_start
        else "ConfigMap not loaded; its last good version stays in force"
    )
    for error in load.errors:
        log.error(
            message,
            extra=fields(
                source=error.source,
                configmap=str(error.ref) if error.ref else None,
                key=error.key,
                reason=error.reason,
            ),
        )
    (metrics.RELOAD_OK if load.ok else metrics.RELOAD_ERROR).inc()


def warn(warning: ConfigMapError) -> None:
    """Log a ConfigMap taken with something odd in it (an empty item skipped, an
    unquoted number), in one shape for every source; once per version, when parsed."""
    log.warning(
        "ConfigMap loaded with a warning",
        extra=fields(configmap=str(warning.ref), key=warning.key, reason=str(warning)),
    )


class SourceError(Exception):
    """A source cannot start; the message is the one line the operator sees."""


class Source(Protocol):
    """What the server does with a source once built: run it, then stop it."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def build(
    holder: MapHolder,
    model_maps: Sequence[str] = (),
    namespaces: Sequence[str] | None = None,
    *,
    reports: bool = True,
    events: bool = False,
) -> list[Source]:
    """The sources for `--model-map` paths and, when `namespaces` is not None,
    `--kubernetes` with those `--namespace`s; raises SourceError when one cannot start.

    The files are loaded here (a file that cannot be used stops the start); the
    Kubernetes source lists on start(), and the holder is not `loaded` until it has.
    `reports`: report every load and reload (`report`). `events`: post Kubernetes Events
    on the ConfigMaps.
    """
    # Imported here: the sources import this module (LoadReport), and a server without
    # --kubernetes never loads the Kubernetes client.
    from bbr.sources.files import FileSource

    if not model_maps and namespaces is None:
        raise SourceError("no model map: give --model-map PATH or --kubernetes")
    on_reload = report if reports else None
    # Every source is made (each declares itself to the holder) before any loads: a file
    # published first would otherwise count as the whole map, and health would say
    # SERVING before the Kubernetes list is in force.
    sources: list[Source] = []
    files = FileSource(model_maps, holder, on_reload=on_reload) if model_maps else None
    if files is not None:
        sources.append(files)
    if namespaces is not None:
        from bbr.sources.kubeclient import KubeConfigError
        from bbr.sources.kubernetes import KubernetesSource

        try:
            kube = KubernetesSource(holder, namespaces, on_reload=on_reload, record_events=events)
        except KubeConfigError as exc:
            raise SourceError(f"{exc.flag}: {exc}") from None
        sources.append(kube)
    if files is not None:
        try:
            loaded = files.load()
        except MapFileError as exc:
            raise SourceError(str(exc)) from None
        if reports:
            report(loaded, at_start=True)
    return sources
