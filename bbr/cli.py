"""`bbr serve` and `bbr validate`.

Every serve flag has an environment twin (`--max-body-bytes` ↔ `BBR_MAX_BODY_BYTES`);
flags win. A bad flag, file or port is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from bbr import __version__
from bbr.config import (
    EXIT_USAGE,
    MESSAGE_OVERHEAD,
    Config,
    StartupError,
    ports,
    startup_failed,
)
from bbr.decision import Options
from bbr.h2grpc import Limits

DEFAULT_LIMITS = Limits()

TRUE = ("1", "true", "yes")
FALSE = ("0", "false", "no")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line naming the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use 1/true/yes or 0/false/no)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1-65535")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def _window(text: str) -> int:
    value = _positive(text)
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{value} is over the HTTP/2 maximum 2147483647")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(choices)})"
            )
        return value

    return parse


# The gRPC port's limits (bbr.h2grpc.Limits): flag, field, type, help. SECURITY.md sums them.
LIMIT_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--max-connections", "max_connections", _positive, "refuse connections beyond this"),
    ("--max-concurrent-streams", "max_streams", _positive, "streams per connection"),
    ("--stream-window", "stream_window", _window, "a stream's HTTP/2 receive window"),
    (
        "--connection-buffer-bytes",
        "connection_buffer",
        _positive,
        "request data admitted per connection",
    ),
    ("--process-buffer-bytes", "process_buffer", _positive, "request data held in all"),
    (
        "--connection-output-bytes",
        "connection_output",
        _positive,
        "answers queued for a peer that does not read",
    ),
    ("--handshake-timeout", "handshake_timeout", _seconds, "TLS handshake and preface"),
    ("--idle-timeout", "idle_timeout", _seconds, "close a connection with no stream"),
    (
        "--first-message-timeout",
        "first_message_timeout",
        _seconds,
        "a stream's first complete message",
    ),
    ("--max-empty-frames", "max_empty_frames", _positive, "consecutive frames without payload"),
    ("--max-continuation-frames", "max_continuations", _positive, "per header block"),
    ("--max-priority-frames", "max_priority_per_stream", _positive, "PRIORITY per stream"),
    (
        "--max-window-updates",
        "max_window_updates_per_data",
        _positive,
        "WINDOW_UPDATE per DATA frame sent",
    ),
    ("--max-pings-per-second", "max_control_per_second", _positive, "PING and SETTINGS"),
    ("--max-resets-per-second", "max_resets_per_second", _positive, "streams reset by a client"),
    ("--max-outbound-frames", "max_outbound_frames", _positive, "queued for a peer not reading"),
    (
        "--max-outbound-control-frames",
        "max_outbound_control_frames",
        _positive,
        "ACKs and resets queued for a peer not reading",
    ),
    ("--frames-per-turn", "frames_per_turn", _positive, "frames per read before yielding"),
]

# flag, type, default, repeatable, help
_SERVE_FLAGS: list[tuple[str, Callable[[str], Any], Any, bool, str]] = [
    ("--grpc-port", _port, 9004, False, "ext_proc gRPC port (server reflection on)"),
    ("--grpc-health-port", _port, 9005, False, "grpc.health.v1 port"),
    ("--metrics-port", _port, 9090, False, "Prometheus /metrics port"),
    ("--model-map", str, None, True, "model-map YAML file or directory; repeatable"),
    ("--kubernetes", _bool, False, False, "watch labelled ConfigMaps through the API"),
    ("--namespace", str, None, True, "namespace to watch (repeatable; * = all)"),
    ("--streaming", _bool, False, False, "Envoy sends the body FULL_DUPLEX_STREAMED"),
    ("--unknown-model", _choice("pass", "reject"), "pass", False, "pass or reject (404)"),
    ("--max-body-bytes", _positive, 16 * 1024 * 1024, False, "larger bodies get 413"),
    ("--models-endpoint", _bool, False, False, "answer GET /v1/models from the model map"),
    ("--secure-serving", _bool, False, False, "TLS on the gRPC port"),
    ("--cert-path", str, None, False, "directory with tls.crt and tls.key"),
    ("--client-ca", str, None, False, "CA bundle: require client certificates (mTLS)"),
    ("--workers", _positive, 1, False, "server processes sharing the port"),
    (
        "--stream-idle-timeout",
        _seconds,
        60.0,
        False,
        "drop a streamed body idle this many seconds",
    ),
    ("--tracing", _bool, False, False, "OpenTelemetry spans, exported as OTEL_* says"),
    *(
        (flag, kind, getattr(DEFAULT_LIMITS, name), False, text)
        for flag, name, kind, text in LIMIT_FLAGS
    ),
    ("--log-level", _choice("debug", "info", "warning", "error"), "info", False, "log level"),
    ("--log-format", _choice("json", "text"), "json", False, "json or text"),
]


def env_name(flag: str) -> str:
    return "BBR_" + flag.lstrip("-").replace("-", "_").upper()


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the ext_proc server",
        description="Run the ext_proc server. Every flag has a BBR_* environment twin.",
    )
    for flag, kind, default, repeatable, text in _SERVE_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        shown = f", default {default}" if default not in (None, False) else ""
        label = f"{text} [env {env_name(flag)}{shown}]"
        if kind is _bool:
            serve.add_argument(
                flag, dest=dest, type=_bool, nargs="?", const=True, default=None, help=label
            )
        elif repeatable:
            serve.add_argument(flag, dest=dest, type=kind, action="append", help=label)
        else:
            serve.add_argument(flag, dest=dest, type=kind, default=None, help=label)
    _add_go_compat(serve)


# The Go BBR's flags with no meaning here (flag -> dest): accepted, so a Go BBR
# Deployment's args keep working, and named in a warning at start.
_GO_BBR_FLAGS = {
    "--v": "go_v",
    "--enable-pprof": "go_enable_pprof",
    "--metrics-endpoint-auth": "go_metrics_endpoint_auth",
    "--zap-log-level": "go_zap_log_level",
}


def _add_go_compat(serve: argparse.ArgumentParser) -> None:
    for flag, dest in _GO_BBR_FLAGS.items():
        names = ("-v", flag) if flag == "--v" else (flag,)
        serve.add_argument(*names, dest=dest, nargs="?", const="true", help=argparse.SUPPRESS)
    serve.add_argument("--plugin", dest="go_plugin", action="append", help=argparse.SUPPRESS)


def go_compat_warnings(args: argparse.Namespace) -> list[str]:
    """One warning for each Go BBR flag given that bbr ignores."""
    return [
        f"{flag} is a Go BBR flag with no effect in bbr; ignored"
        for flag, dest in _GO_BBR_FLAGS.items()
        if getattr(args, dest, None) is not None
    ]


def _apply_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill flags not given on the command line from BBR_* variables, then defaults."""
    for flag, kind, default, repeatable, _ in _SERVE_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        if getattr(args, dest) is not None:
            continue
        raw = os.environ.get(env_name(flag))
        if raw is None or (raw == "" and kind is not str):
            setattr(args, dest, [] if repeatable else default)
            continue
        try:
            if repeatable:
                value: Any = [kind(v.strip()) for v in raw.split(",") if v.strip()]
            else:
                value = kind(raw)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{env_name(flag)} (for {flag}): {exc}")
        setattr(args, dest, value)


def build_parser() -> tuple[OneLineParser, dict[str, OneLineParser]]:
    parser = OneLineParser(prog="bbr", description="Body-based router for LLM inference gateways.")
    parser.add_argument("--version", action="version", version=f"bbr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_serve(sub)
    validate = sub.add_parser(
        "validate",
        help="check model-map files and print the resolved table",
        description="Parse model-map files exactly as serve does; exit 1 on any error.",
    )
    validate.add_argument("paths", nargs="*", metavar="PATH")
    validate.add_argument(
        "--live",
        metavar="URL",
        help="instead of files: the map in force in a running bbr (its metrics port, "
        "e.g. http://127.0.0.1:9090; /modelmap is added when no path is given)",
    )
    return parser, {"serve": sub.choices["serve"], "validate": validate}


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        if args.live is not None:
            if args.paths:
                subparsers["validate"].error("argument --live: give either --live URL or PATH...")
            from bbr.validate import run_live

            return run_live(args.live)
        if not args.paths:
            subparsers["validate"].error("the following arguments are required: PATH")
        from bbr.validate import run as validate

        return validate(args.paths)
    serve_parser = subparsers["serve"]
    _apply_env(args, serve_parser)
    return _serve(args, serve_parser)


def _serve(args: argparse.Namespace, parser: OneLineParser) -> int:
    metrics_dir = None
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Workers write their metrics here; the supervisor sums them. Must be set
        # before prometheus_client is imported.
        metrics_dir = tempfile.mkdtemp(prefix="bbr-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    from bbr import logs

    seen: dict[int, str] = {}
    for port, flag in ports(args):
        if port in seen:
            parser.error(f"argument {flag}: port {port} is also {seen[port]}")
        seen[port] = flag
    if args.go_plugin:
        parser.error(
            "argument --plugin: bbr has no plugins; it reads `model` and routes on the "
            "model map (see README, 'Moving from the Go BBR')"
        )
    if args.client_ca and not args.secure_serving:
        parser.error("argument --client-ca: needs --secure-serving")
    if args.namespace and not args.kubernetes:
        parser.error("argument --namespace: needs --kubernetes")
    for flag, path in (("--cert-path", args.cert_path), ("--client-ca", args.client_ca)):
        if path and not os.path.exists(path):
            parser.error(f"argument {flag}: {path}: no such file or directory")

    limits = Limits(
        **{
            name: getattr(args, flag.lstrip("-").replace("-", "_"))
            for flag, name, _, _ in LIMIT_FLAGS
        },
        stream_idle_timeout=args.stream_idle_timeout,
    )
    message = args.max_body_bytes + MESSAGE_OVERHEAD
    if limits.connection_buffer < message:
        parser.error(
            f"argument --connection-buffer-bytes: {limits.connection_buffer} is less than"
            f" one message (--max-body-bytes + 64 KiB = {message})"
        )
    if limits.process_buffer < limits.connection_buffer:
        parser.error(
            f"argument --process-buffer-bytes: {limits.process_buffer} is less than"
            f" --connection-buffer-bytes ({limits.connection_buffer})"
        )
    logs.configure(args.log_level, args.log_format)
    for warning in go_compat_warnings(args):
        logging.getLogger("bbr").warning(warning)
    config = Config(
        model_maps=args.model_map,
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        streaming=args.streaming,
        options=Options(
            unknown_model=args.unknown_model,
            max_body_bytes=args.max_body_bytes,
            models_endpoint=args.models_endpoint,
        ),
        kubernetes=args.kubernetes,
        namespaces=args.namespace,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        client_ca=args.client_ca,
        workers=args.workers,
        stream_idle_seconds=args.stream_idle_timeout,
        limits=limits,
        tracing=args.tracing,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    try:
        return _run(config)
    except StartupError as exc:
        return startup_failed(exc)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(config: Config) -> int:
    """One process, or a supervisor of --workers N running `server.run_worker` in each.

    Imported here, after PROMETHEUS_MULTIPROC_DIR is set (prometheus_client reads it once).
    """
    from bbr import server

    if config.workers > 1:
        from bbr import workers

        return asyncio.run(workers.supervise(config, target=server.run_worker))
    return server.run(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
