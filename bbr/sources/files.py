"""Model-map files: read at start, then polled for changes.

Polling reads every file's bytes (model maps are small), so every way of changing a
file is seen: in-place rewrites, atomic renames and the kubelet's `..data` symlink
swap in a mounted ConfigMap volume. A file that does not parse changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bbr.modelmap import (
    ConfigMapError,
    ConfigMapRef,
    MapFileError,
    MapHolder,
    ModelConfig,
    parse_file_text,
)
from bbr.sources import LoadReport, warn

log = logging.getLogger("bbr.sources.files")

SUFFIXES = (".yaml", ".yml", ".json")
POLL_SECONDS = 0.5


def expand(paths: Sequence[str]) -> list[tuple[tuple[int, ...], str]]:
    """The files behind --model-map arguments, in conflict order, with their position.

    A directory means its regular *.yaml, *.yml and *.json files (symlinks followed),
    skipping hidden entries and subdirectories. Raises MapFileError for a path that is
    neither.
    """
    files: list[tuple[tuple[int, ...], str]] = []
    for arg_index, raw in enumerate(paths):
        path = Path(raw)
        if path.is_dir():
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise MapFileError(raw, f"cannot read directory: {exc.strerror}") from None
            position = 0
            for name in names:
                candidate = path / name
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                if not candidate.is_file():  # follows symlinks; skips dirs and dangling links
                    continue
                files.append(((arg_index, position), str(candidate)))
                position += 1
        elif path.is_file():
            files.append(((arg_index, 0), raw))
        elif path.exists():
            raise MapFileError(raw, "not a regular file or directory")
        else:
            raise MapFileError(raw, "no such file or directory")
    return files


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "directory"
    if os.path.exists(path):
        return "file"
    return "missing"


def read_file(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(), int(os.fstat(f.fileno()).st_mtime)
    except OSError as exc:
        raise MapFileError(path, f"cannot read: {exc.strerror}") from None


@dataclass(slots=True)
class _FileState:
    data: bytes
    configs: list[ModelConfig]
    errors: list[ConfigMapError] = field(default_factory=list)


class FileSource:
    """Keeps the model map in step with files; feeds a MapHolder.

    `on_reload` gets the LoadReport of each reload that changed something or found a
    file it cannot use (`bbr.sources.report` when bbr serves); `load` returns the first.
    """

    name = "files"

    def __init__(
        self,
        paths: Sequence[str],
        holder: MapHolder,
        *,
        on_reload: Callable[[LoadReport], None] | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.paths = list(paths)
        self.holder = holder
        self.on_reload = on_reload
        self.poll_seconds = poll_seconds
        self._files: dict[str, _FileState] = {}
        # Last good version of each ConfigMap, kept while a newer version is invalid.
        self._last_good: dict[ConfigMapRef, ModelConfig] = {}
        # What was last wrong with each path (bytes that did not parse, or a read error),
        # so a file that stays broken is reported once, not on every poll.
        self._bad: dict[str, bytes | str] = {}
        self._emptied: set[str] = set()
        self._kinds: dict[str, str] = {}  # what each --model-map argument was at start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        holder.expect(self.name)

    def load(self) -> LoadReport:
        """First load: any unusable file is fatal (raises MapFileError)."""
        report = self._scan(strict=True)
        self._publish()
        return report

    def reload(self) -> LoadReport:
        """Re-read everything; publish a new map only when something changed."""
        report = self._scan(strict=False)
        if report.changed:
            self._publish()
        return report

    def _scan(self, *, strict: bool) -> LoadReport:
        report = LoadReport()
        for arg in self.paths:
            kind = _kind(arg)
            expected = self._kinds.setdefault(arg, kind)
            if kind != expected and kind != "missing":
                # A file turned into a directory (or back) is a mistake, not an edit.
                problem = MapFileError(arg, f"was a {expected}, is now a {kind}")
                if strict:
                    raise problem
                self._note_bad(report, arg, str(problem), problem)
                return report
        try:
            files = expand(self.paths)
        except MapFileError as exc:
            if strict:
                raise
            self._note_bad(report, exc.path, str(exc), exc)
            return report  # a vanished source keeps the map it gave
        seen: dict[str, _FileState] = {}
        for position, path in files:
            previous = self._files.get(path)
            try:
                data, mtime = read_file(path)
            except MapFileError as exc:
                if strict:
                    raise
                self._note_bad(report, path, str(exc), exc)
                if previous is not None:
                    seen[path] = previous
                continue
            if (previous is not None and previous.data == data) or self._bad.get(path) == data:
                if previous is not None:
                    seen[path] = previous
                continue
            if not data and previous is not None and path not in self._emptied:
                # A writer that truncates then writes: give it one more poll.
                self._emptied.add(path)
                seen[path] = previous
                continue
            self._emptied.discard(path)
            try:
                parsed = parse_file_text(data, path=path, position=position, created=mtime)
            except MapFileError as exc:
                if strict:
                    raise
                self._note_bad(report, path, data, exc)
                if previous is not None:
                    seen[path] = previous  # a file that does not parse changes nothing
                continue
            self._bad.pop(path, None)
            for warning in parsed.warnings:
                warn(warning)
            configs = list(parsed.configs)
            valid_refs = {c.ref for c in configs}
            for ref in parsed.invalid_refs:
                good = self._last_good.get(ref)
                if good is not None and ref not in valid_refs:
                    configs.append(good)
            seen[path] = _FileState(data, configs, parsed.errors)
            report.errors.extend(parsed.errors)
            report.changed = True
        if set(seen) != set(self._files):
            report.changed = True
        listed = {path for _, path in files}
        for path in [p for p in self._bad if p not in listed and p not in self.paths]:
            del self._bad[path]  # gone from its directory: forget what was wrong with it
        if not report.file_errors:
            for arg in self.paths:
                if isinstance(self._bad.get(arg), str):
                    del self._bad[arg]
        self._files = seen
        for state in seen.values():
            for config in state.configs:
                self._last_good[config.ref] = config
        live = {c.ref for state in seen.values() for c in state.configs}
        self._last_good = {ref: c for ref, c in self._last_good.items() if ref in live}
        return report

    def _note_bad(
        self, report: LoadReport, path: str, what: bytes | str, exc: MapFileError
    ) -> None:
        if self._bad.get(path) != what:
            self._bad[path] = what
            report.file_errors.append(exc)

    def _publish(self) -> None:
        configs = [c for state in self._files.values() for c in state.configs]
        errors = [e for state in self._files.values() for e in state.errors]
        self.holder.publish(self.name, configs, errors)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bbr-file-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                report = self.reload()
            except Exception:  # never let the watcher die: the map in force stays
                log.exception("model map reload crashed; keeping the map in force")
                continue
            if (report.changed or report.file_errors) and self.on_reload is not None:
                self.on_reload(report)
