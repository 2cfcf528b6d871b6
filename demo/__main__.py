"""``python -m demo`` (``make run``): bbr, a real Envoy and two simulated model servers.

Starts one simulated model server per base model in the model map (ports 8001, 8002,
...), bbr on its default ports (9004 gRPC, 9005 health, 9090 metrics), and Envoy on
127.0.0.1:8080 (admin 9901) with bbr as its first ext_proc filter. Prints curl lines to
try, then runs until Ctrl-C or SIGTERM, which stop every child and exit 0. If a child
dies on its own, the others are stopped and the demo exits 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from demo.envoy_config import render
from demo.processes import (
    REPO_ROOT,
    Child,
    StartupError,
    bbr_argv,
    envoy_argv,
    envoy_binary,
    grpc_health_ready,
    http_ready,
    port_in_use,
    stop_all,
    tcp_ready,
    wait_until,
)

LISTEN_PORT = 8080
ADMIN_PORT = 9901
FIRST_MODEL_PORT = 8001
BBR_GRPC_PORT = 9004
BBR_HEALTH_PORT = 9005
BBR_METRICS_PORT = 9090


def _config_maps(documents: list[Any]) -> list[dict[str, Any]]:
    maps: list[dict[str, Any]] = []
    for doc in documents:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List":
            maps += _config_maps(list(doc.get("items") or []))
        elif doc.get("kind") == "ConfigMap":
            maps.append(doc)
    return maps


def read_model_map(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Base model → pool name, and every model name → its base model, in file order.

    Only what the demo needs to start model servers and print examples; bbr itself
    reads and validates the map.
    """
    with path.open(encoding="utf-8") as fh:
        documents = list(yaml.safe_load_all(fh))
    pools: dict[str, str] = {}
    models: dict[str, str] = {}
    for cm in _config_maps(documents):
        data = cm.get("data") or {}
        base = data.get("baseModel")
        if not isinstance(base, str) or not base.strip():
            continue
        base = base.strip()
        if base not in pools:
            pools[base] = "pool-" + str((cm.get("metadata") or {}).get("name") or len(pools) + 1)
        adapters = yaml.safe_load(data.get("adapters") or "[]") or []
        for name in [base, *(str(a).strip() for a in adapters if isinstance(a, str))]:
            if name and name not in models:
                models[name] = base
    return pools, models


def curl_examples(models: dict[str, str]) -> list[str]:
    """One curl line per model in the map, then /v1/models, spoofing and error cases."""
    url = f"http://localhost:{LISTEN_PORT}"
    json_type = "-H 'content-type: application/json'"

    def chat(body: str, extra: str = "") -> str:
        return f"curl -s {url}/v1/chat/completions {json_type}{extra} -d {shlex.quote(body)}"

    lines = [
        chat(json.dumps({"model": m, "messages": [{"role": "user", "content": "hi"}]}))
        for m in models
    ]
    lines.append(f"curl -s {url}/v1/models")
    # A client-sent routing header naming another base model is replaced by bbr's.
    pairs = [(m, b) for m in models for b in dict.fromkeys(models.values()) if b != models[m]]
    if pairs:
        model, other = next((p for p in pairs if p[0] not in models.values()), pairs[0])
        spoof = f" -H {shlex.quote('x-gateway-base-model-name: ' + other)}"
        lines.append(chat(json.dumps({"model": model, "messages": []}), spoof))
    lines.append(chat(json.dumps({"model": "no-such-model", "messages": []})))
    lines.append(chat('{"model": '))
    return lines


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--model-map", type=Path, default=REPO_ROOT / "config" / "model-map.yaml")
    parser.add_argument("--streaming", action="store_true", help="FULL_DUPLEX_STREAMED mode")
    args = parser.parse_args(argv)
    model_map: Path = args.model_map.resolve()

    try:
        pools, models = read_model_map(model_map)
    except (OSError, yaml.YAMLError) as exc:
        print(f"demo: cannot read model map {model_map}: {exc}", file=sys.stderr)
        return 2
    if not pools:
        print(f"demo: no base models in {model_map}", file=sys.stderr)
        return 2
    routes = {base: FIRST_MODEL_PORT + i for i, base in enumerate(pools)}
    ports = {
        **{f"model server {pools[b]}": p for b, p in routes.items()},
        "Envoy": LISTEN_PORT,
        "Envoy admin": ADMIN_PORT,
        "bbr gRPC": BBR_GRPC_PORT,
        "bbr health": BBR_HEALTH_PORT,
        "bbr metrics": BBR_METRICS_PORT,
    }
    busy = [f"{what} ({port})" for what, port in ports.items() if port_in_use(port)]
    if busy:
        print(f"demo: port already in use: {', '.join(busy)}", file=sys.stderr)
        return 2
    try:
        envoy = envoy_binary()
    except StartupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2

    work = REPO_ROOT / ".demo"
    work.mkdir(exist_ok=True)
    envoy_yaml = work / "envoy.yaml"
    envoy_yaml.write_text(
        render(
            listen_port=LISTEN_PORT,
            admin_port=ADMIN_PORT,
            bbr_port=BBR_GRPC_PORT,
            routes=routes,
            streaming=args.streaming,
            access_log=True,
        ),
        encoding="utf-8",
    )

    stop_requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()
        raise _Stop(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    children: list[Child] = []
    try:
        for base, port in routes.items():
            child = Child(
                pools[base],
                [
                    sys.executable,
                    "-m",
                    "demo.model_server",
                    "--port",
                    str(port),
                    "--name",
                    pools[base],
                    "--base-model",
                    base,
                    "--quiet",
                ],
                cwd=REPO_ROOT,
            )
            children.append(child)
        bbr_command = bbr_argv(
            model_map,
            grpc_port=BBR_GRPC_PORT,
            health_port=BBR_HEALTH_PORT,
            metrics_port=BBR_METRICS_PORT,
            streaming=args.streaming,
            flags=["--models-endpoint", "--log-format", "text"],
        )
        bbr = Child("bbr", bbr_command, cwd=REPO_ROOT)
        children.append(bbr)
        proxy = Child(
            "envoy",
            envoy_argv(envoy_yaml, binary=envoy),
            cwd=REPO_ROOT,
        )
        children.append(proxy)

        for child, port in zip(children, routes.values(), strict=False):
            wait_until(child.name, http_ready(port, "/health"), child=child)
        wait_until("bbr", grpc_health_ready(BBR_HEALTH_PORT), child=bbr, timeout=30)
        wait_until("bbr gRPC port", tcp_ready(BBR_GRPC_PORT), child=bbr)
        wait_until("envoy", http_ready(ADMIN_PORT, "/ready"), child=proxy, timeout=30)

        mode = "streaming (FULL_DUPLEX_STREAMED)" if args.streaming else "buffered"
        print(
            f"\nbbr demo ready ({mode}): Envoy on http://localhost:{LISTEN_PORT}, "
            f"bbr on :{BBR_GRPC_PORT} (metrics http://localhost:{BBR_METRICS_PORT}/metrics)",
            flush=True,
        )
        for base, port in routes.items():
            print(f"  {pools[base]:<30} :{port}  {base}", flush=True)
        print("\nTry:\n", flush=True)
        for line in curl_examples(models):
            print(f"  {line}", flush=True)
        print("\nCtrl-C to stop.\n", flush=True)

        while not stop_requested.wait(0.25):
            for child in children:
                code = child.exited()
                if code is not None:
                    print(
                        f"demo: {child.name} (pid {child.pid}) exited with code {code}; "
                        "stopping the rest",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
    except _Stop:
        pass
    except StartupError as exc:
        print(f"demo: {exc}; stopping the rest", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C must not interrupt the clean-up.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stop_all(children)
    if received:
        print(f"demo: stopped ({signal.Signals(received[0]).name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
