"""``python -m demo`` (``make run``): bbr, a real Envoy and two simulated model servers.

Starts one simulated model server per base model in the model map (ports 8001, 8002,
...), bbr on its default ports (9004 gRPC, 9005 health, 9090 metrics), and Envoy on
127.0.0.1:8080 (admin 9901) with bbr as its first ext_proc filter. Every port has a
flag (0 picks a free one), so the demo runs beside another stack. Prints curl lines to
try, then runs until Ctrl-C or SIGTERM, which stop every child and exit 0. If a child
dies on its own, the others are stopped and the demo exits 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path

from bbr.modelmap import MapFileError
from harness.envoy_config import render
from harness.modelmaps import read_model_map
from harness.processes import (
    REPO_ROOT,
    Cancelled,
    Child,
    StartupError,
    bbr_argv,
    envoy_argv,
    envoy_binary,
    free_port,
    grpc_health_ready,
    http_ready,
    port_in_use,
    stop_all,
    tcp_ready,
    wait_until,
)
from harness.signals import StopSignals

LISTEN_PORT = 8080
ADMIN_PORT = 9901
FIRST_MODEL_PORT = 8001
BBR_GRPC_PORT = 9004
BBR_HEALTH_PORT = 9005
BBR_METRICS_PORT = 9090


def curl_examples(models: dict[str, str], port: int = LISTEN_PORT) -> list[str]:
    """One curl line per model in the map, then /v1/models, spoofing and error cases."""
    url = f"http://localhost:{port}"
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


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="bbr, a real Envoy and simulated model servers on localhost.",
        epilog="Every port flag takes 0 for a free port; the ports in use are printed.",
    )
    parser.add_argument("--model-map", type=Path, default=REPO_ROOT / "config" / "model-map.yaml")
    parser.add_argument("--streaming", action="store_true", help="FULL_DUPLEX_STREAMED mode")
    parser.add_argument(
        "--unknown-model",
        choices=("pass", "reject"),
        default="pass",
        help="bbr's --unknown-model: pass (Envoy's catch-all 404) or reject (bbr's 404)",
    )
    parser.add_argument("--port", type=_port, default=LISTEN_PORT, help="Envoy's listener")
    parser.add_argument("--admin-port", type=_port, default=ADMIN_PORT, help="Envoy's admin")
    parser.add_argument(
        "--model-port",
        type=_port,
        default=FIRST_MODEL_PORT,
        help="the first model server's port; the next ones follow it (0: free ports)",
    )
    parser.add_argument("--grpc-port", type=_port, default=BBR_GRPC_PORT, help="bbr's ext_proc")
    parser.add_argument("--grpc-health-port", type=_port, default=BBR_HEALTH_PORT)
    parser.add_argument("--metrics-port", type=_port, default=BBR_METRICS_PORT)
    return parser.parse_args(argv)


def _or_free(port: int) -> int:
    return port or free_port()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_map: Path = args.model_map.resolve()

    try:
        pools, models = read_model_map(model_map)
    except (OSError, MapFileError) as exc:
        print(f"demo: cannot read model map {model_map}: {exc}", file=sys.stderr)
        return 2
    if not pools:
        print(f"demo: no base models in {model_map}", file=sys.stderr)
        return 2
    listen_port = _or_free(args.port)
    admin_port = _or_free(args.admin_port)
    grpc_port = _or_free(args.grpc_port)
    health_port = _or_free(args.grpc_health_port)
    metrics_port = _or_free(args.metrics_port)
    routes = {
        base: (args.model_port + i if args.model_port else free_port())
        for i, base in enumerate(pools)
    }
    ports = {
        **{f"model server {pools[b]} (--model-port)": p for b, p in routes.items()},
        "Envoy (--port)": listen_port,
        "Envoy admin (--admin-port)": admin_port,
        "bbr gRPC (--grpc-port)": grpc_port,
        "bbr health (--grpc-health-port)": health_port,
        "bbr metrics (--metrics-port)": metrics_port,
    }
    taken: dict[int, str] = {}
    for what, port in ports.items():
        if port in taken:
            print(f"demo: {what} and {taken[port]} both use port {port}", file=sys.stderr)
            return 2
        taken[port] = what
    busy = [f"{what} {port}" for what, port in ports.items() if port_in_use(port)]
    if busy:
        print(
            f"demo: port already in use: {', '.join(busy)}; pick others (0: a free one)",
            file=sys.stderr,
        )
        return 2
    try:
        envoy = envoy_binary()
    except StartupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2

    work = REPO_ROOT / ".demo"
    work.mkdir(exist_ok=True)
    envoy_yaml = work / f"envoy-{listen_port}.yaml"
    envoy_yaml.write_text(
        render(
            listen_port=listen_port,
            admin_port=admin_port,
            bbr_port=grpc_port,
            routes=routes,
            streaming=args.streaming,
            access_log=True,
        ),
        encoding="utf-8",
    )

    # Signals only set a flag and wake a pipe: a handler that takes a lock (as
    # threading.Event.set does) can wait forever on its own main thread.
    stop = StopSignals()
    children: list[Child] = []
    try:
        for base, port in routes.items():
            child = Child(
                pools[base],
                [
                    sys.executable,
                    "-m",
                    "harness.model_server",
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
            grpc_port=grpc_port,
            health_port=health_port,
            metrics_port=metrics_port,
            streaming=args.streaming,
            flags=[
                "--models-endpoint",
                "--log-format",
                "text",
                "--unknown-model",
                args.unknown_model,
            ],
        )
        bbr = Child("bbr", bbr_command, cwd=REPO_ROOT)
        children.append(bbr)
        proxy = Child(
            "envoy",
            envoy_argv(envoy_yaml, binary=envoy),
            cwd=REPO_ROOT,
        )
        children.append(proxy)

        stopped = lambda: stop.stopped  # noqa: E731
        for child, port in zip(children, routes.values(), strict=False):
            wait_until(child.name, http_ready(port, "/health"), child=child, stop=stopped)
        wait_until("bbr", grpc_health_ready(health_port), child=bbr, timeout=30, stop=stopped)
        wait_until("bbr gRPC port", tcp_ready(grpc_port), child=bbr, stop=stopped)
        wait_until("envoy", http_ready(admin_port, "/ready"), child=proxy, timeout=30, stop=stopped)

        mode = "streaming (FULL_DUPLEX_STREAMED)" if args.streaming else "buffered"
        print(
            f"\nbbr demo ready ({mode}, --unknown-model {args.unknown_model}): Envoy on "
            f"http://localhost:{listen_port}, bbr on :{grpc_port} "
            f"(metrics http://localhost:{metrics_port}/metrics)",
            flush=True,
        )
        for base, port in routes.items():
            print(f"  {pools[base]:<30} :{port}  {base}", flush=True)
        print("\nTry:\n", flush=True)
        for line in curl_examples(models, listen_port):
            print(f"  {line}", flush=True)
        print(
            f"\nOpenAI SDK: OpenAI(base_url='http://localhost:{listen_port}/v1', "
            "api_key='unused')\nCtrl-C to stop.\n",
            flush=True,
        )

        while not stop.wait(0.25):
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
    except Cancelled:
        pass
    except StartupError as exc:
        if not stop.stopped:
            print(f"demo: {exc}; stopping the rest", file=sys.stderr, flush=True)
            return 1
    finally:
        stop.ignore()  # a second Ctrl-C must not interrupt the clean-up
        stop_all(children)
        stop.close()
    if stop.received is not None:
        print(f"demo: stopped ({signal.Signals(stop.received).name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
