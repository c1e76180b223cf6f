"""The command line: ``serve``, ``check-config``, ``config show``, and the client
commands ``trigger`` (alias ``t``), ``functions``, ``workers`` and ``triggers``.

Exit codes (documented for systemd's ``RestartPreventExitStatus=2``):

* 0: clean shutdown; a client command succeeded;
* 1: the engine crashed (a module failed), or a listener could not bind its
  address (the line names the address and the config keys that set it); the
  reason is printed on one line.
  For a client command: an unexpected failure, or an answer it cannot read;
* 2: a config or usage error (the file, the key and the reason are printed);
* 3: an adapter's backend was unreachable at start;
* 4: client commands: the call was answered with an error (code and message
  are printed);
* 5: client commands: the engine could not be reached (refused, closed, TLS,
  token refused, not an iii engine, or lost before answering);
* 6: client commands: the call was sent and no answer came within
  ``--timeout`` (it may have run);
* 130: client commands: interrupted (Ctrl-C).

The client commands' logic is in :mod:`iii.client` and :mod:`iii.client_io`;
this module only wires their options and maps their errors to exit codes.
Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import enum
import gc
import logging
import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from iii import __version__
from iii.config import EngineConfig, dump_config, load_config
from iii.errors import AdapterUnavailableError, BindError, ConfigError
from iii.log import LOG_FORMAT, LineFormatter, clean

__all__ = ["main", "ExitCode"]

log = logging.getLogger("iii")

CLIENT_COMMANDS = ("trigger", "t", "functions", "workers", "triggers")


class ExitCode(enum.IntEnum):
    OK = 0
    CRASH = 1
    CONFIG = 2
    ADAPTER_UNREACHABLE = 3
    CALL_FAILED = 4
    ENGINE_UNREACHABLE = 5
    TIMEOUT = 6
    INTERRUPTED = 130


def _config_path(given: str | None) -> str | None:
    """An explicit ``-c`` must exist; otherwise ``./config.yaml`` is used if present."""
    if given is not None:
        return given
    default = Path("config.yaml")
    return str(default) if default.exists() else None


def _leaf(exc: BaseException) -> BaseException:
    """Collapse one-leaf exception groups so the message is readable."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _setup_logging(level: str) -> None:
    # One record per line, peer text escaped and bounded (iii.log).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


# The cyclic collector's first threshold for ``serve`` (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def _tune_gc() -> None:
    """The collector policy of a serving engine (process-wide, so set here only).

    With CPython's defaults a reply that builds a few thousand containers
    (``engine::workers::list`` with 4,000 workers) runs several young
    collections while it is built; its items survive them, are promoted,
    and push the oldest generation into a full collection, which walks every
    object of the engine: hundreds of milliseconds with 4,000 workers, paid
    by whichever call lands on it.  A young threshold of 50,000 lets such a
    reply die young, and :func:`gc.freeze` takes what was loaded at startup
    (code, config) out of every later collection.  Refcounting still frees
    everything acyclic at once; only cyclic garbage waits longer.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _serve(config: EngineConfig, file: str | None = None) -> ExitCode:
    # serve_engine, plus READY/WATCHDOG/STOPPING when run by systemd (Type=notify).
    from iii.systemd import serve_with_systemd

    _tune_gc()
    try:
        trio.run(serve_with_systemd, config)
    except KeyboardInterrupt:
        return ExitCode.OK
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            print(f"iii: config error: {leaf}", file=sys.stderr)
            return ExitCode.CONFIG
        if isinstance(leaf, AdapterUnavailableError):
            print(f"iii: adapter unreachable: {leaf.message}", file=sys.stderr)
            return ExitCode.ADAPTER_UNREACHABLE
        if isinstance(leaf, BindError):
            print(f"iii: cannot start: {leaf.describe(file)}", file=sys.stderr)
            return ExitCode.CRASH
        if isinstance(leaf, OSError) and leaf.errno is not None:
            print(f"iii: cannot start: {leaf}", file=sys.stderr)
            return ExitCode.CRASH
        log.debug("engine crashed", exc_info=exc)
        print(f"iii: engine crashed: {type(leaf).__name__}: {clean(str(leaf))}", file=sys.stderr)
        return ExitCode.CRASH
    return ExitCode.OK


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds: {text!r}")
    return value / 1000


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text!r}")
    return value


_CLIENT_EXIT_CODES = (
    "exit codes: 0 ok, 1 an answer that cannot be read, 2 usage, 4 the call answered an"
    " error, 5 the engine could not be reached, 6 no answer within --timeout"
)


def _add_client_commands(commands: Any) -> argparse.ArgumentParser:
    """``trigger`` (alias ``t``), ``functions``, ``workers``, ``triggers``; returns ``trigger``.

    Upstream's ``iii trigger`` forms are accepted too: ``--json``, ``key=value``
    arguments, ``--address``/``--port``, ``--timeout-ms`` and (its first
    version) ``--function-id``.
    """
    connection = argparse.ArgumentParser(add_help=False)
    where = connection.add_argument_group("engine connection")
    where.add_argument(
        "--url",
        help="ws:// or wss:// URL of the engine (default $III_URL, else ws://127.0.0.1:49134)",
    )
    where.add_argument("--address", help="engine host, with --port: upstream's form of --url")
    where.add_argument("--port", type=_port, help="engine port with --address (default 49134)")
    where.add_argument(
        "--token", help="bearer token (default $III_TOKEN; prefer the variable: ps shows arguments)"
    )
    timeouts = where.add_mutually_exclusive_group()
    timeouts.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="give up after S seconds (default 30)",
    )
    timeouts.add_argument(
        "--timeout-ms",
        type=_positive_ms,
        dest="timeout",
        metavar="MS",
        help="the same, in milliseconds",
    )

    trigger: argparse.ArgumentParser = commands.add_parser(
        "trigger",
        aliases=["t"],
        parents=[connection],
        help="call a function on a running engine; print its result as JSON",
        epilog=_CLIENT_EXIT_CODES,
    )
    trigger.add_argument(
        "function_id", nargs="?", metavar="FUNCTION_ID", help="the function to call"
    )
    trigger.add_argument(
        "arguments",
        nargs="*",
        metavar="KEY=VALUE | -",
        help="payload fields (the value is JSON if it parses, else a string);"
        " - reads the payload from stdin",
    )
    trigger.add_argument("--payload", metavar="JSON", help="the payload (default {})")
    trigger.add_argument("--json", metavar="JSON", help="the same as --payload (upstream's name)")
    trigger.add_argument(
        "--payload-file", metavar="FILE", help="read the payload from FILE (- is stdin)"
    )
    trigger.add_argument("--function-id", dest="function_id_option", help=argparse.SUPPRESS)
    trigger.add_argument(
        "--void", action="store_true", help="fire and forget: send the call, wait for no result"
    )
    for kind, text in (
        ("functions", "list the functions registered on a running engine"),
        ("workers", "list the workers connected to a running engine"),
        ("triggers", "list the triggers registered on a running engine"),
    ):
        lister = commands.add_parser(
            kind, parents=[connection], help=text, epilog=_CLIENT_EXIT_CODES
        )
        lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if kind != "workers":
            lister.add_argument(
                "--include-internal",
                action="store_true",
                help="include the engine's own (engine::...)",
            )
    return trigger


def _trigger_target(
    args: argparse.Namespace, extra: list[str], trigger: argparse.ArgumentParser
) -> tuple[str, list[str]]:
    # Positionals after an option arrive in ``extra`` (argparse takes them in one run).
    unknown = [token for token in extra if token.startswith("-") and token != "-"]
    if unknown:
        trigger.error(f"unrecognized arguments: {' '.join(unknown)}")
    tokens = ([args.function_id] if args.function_id is not None else []) + args.arguments + extra
    if args.function_id_option is not None:
        function_id = args.function_id_option
    elif tokens:
        function_id, tokens = tokens[0], tokens[1:]
    else:
        trigger.error("FUNCTION_ID is required")
    if not function_id or function_id == "-":
        trigger.error(f"not a function id: {function_id!r}")
    return function_id, tokens


def _write(text: str) -> None:
    try:
        sys.stdout.buffer.write(text.encode())
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (``| head``): the rest is not wanted, and not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _client_exit_code(exc: Exception) -> ExitCode:
    from iii import client

    for error_type, code in (
        (client.UsageError, ExitCode.CONFIG),
        (client.CallFailedError, ExitCode.CALL_FAILED),
        (client.EngineUnreachableError, ExitCode.ENGINE_UNREACHABLE),
        (client.CallTimeoutError, ExitCode.TIMEOUT),
    ):
        if isinstance(exc, error_type):
            return code
    return ExitCode.CRASH  # BadAnswerError: an answer the command cannot read


def _run_client(
    args: argparse.Namespace, extra: list[str], trigger: argparse.ArgumentParser
) -> int:
    from iii import client, client_io

    try:
        endpoint = client.Endpoint.from_options(
            url=args.url, address=args.address, port=args.port, token=args.token
        )
        timeout = args.timeout or client.DEFAULT_TIMEOUT
        if args.command in ("trigger", "t"):
            function_id, tokens = _trigger_target(args, extra, trigger)
            payload = client_io.build_payload(
                payload=args.payload,
                json_text=args.json,
                payload_file=args.payload_file,
                arguments=tokens,
                stdin=sys.stdin.buffer,
            )
            call = partial(
                client.call_function,
                endpoint,
                function_id,
                payload,
                timeout=timeout,
                void=args.void,
            )
            result = trio.run(call)
            if not args.void:
                _write(client_io.render_json(result))
            return ExitCode.OK
        listing = partial(
            client.fetch_list,
            endpoint,
            args.command,
            timeout=timeout,
            include_internal=getattr(args, "include_internal", False),
        )
        answer = trio.run(listing)
        if args.json:
            _write(client_io.render_json(answer[args.command]))
        else:
            _write(client_io.render_table(args.command, answer))
        return ExitCode.OK
    except KeyboardInterrupt:
        print("iii: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        leaf = _leaf(exc)
        if isinstance(leaf, client.ClientError):
            print(client_io.describe_failure(leaf), file=sys.stderr, end="")
            return _client_exit_code(leaf)
        log.debug("client command failed", exc_info=exc)
        print(f"iii: unexpected error: {type(leaf).__name__}: {clean(str(leaf))}", file=sys.stderr)
        return ExitCode.CRASH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iii", description="iii orchestration engine")
    parser.add_argument("--version", action="version", version=f"iii {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("III_LOG_LEVEL", "info"),
        help="debug, info, warning, error",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the engine")
    serve.add_argument(
        "-c", "--config", help="config file (YAML or TOML); default ./config.yaml if present"
    )
    serve.add_argument(
        "--processes",
        help="engine processes sharing the ports as one cluster (a number or 'auto' = cores); "
        "overrides the config's processes key",
    )
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    config_cmd = commands.add_parser("config", help="config utilities")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective config with every default")
    show.add_argument("-c", "--config")
    show.add_argument("--format", choices=("yaml", "toml"), default="yaml")
    # Alias kept for the style guide's name.
    print_config = commands.add_parser("print-config", help="same as 'config show'")
    print_config.add_argument("-c", "--config")
    print_config.add_argument("--format", choices=("yaml", "toml"), default="yaml")
    trigger = _add_client_commands(commands)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("trigger", "t"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.log_level)
    if args.command in CLIENT_COMMANDS:
        return _run_client(args, extra, trigger)
    try:
        if args.command == "check-config":
            # What serve checks before it starts anything, `processes:` included.
            _processes(load_config(args.file), None, args.file)
            print(f"{args.file}: ok")
            return ExitCode.OK
        if args.command in ("config", "print-config"):
            config = load_config(_config_path(args.config))
            sys.stdout.write(dump_config(config, args.format))
            return ExitCode.OK
        file = _config_path(args.config)
        config = load_config(file)
        processes = _processes(config, args.processes, file)
    except ConfigError as exc:
        print(f"iii: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if processes > 1:
        return _supervise(config, file, processes, args.log_level)
    return _serve(config, file)


def _processes(config: EngineConfig, given: str | None, file: str | None) -> int:
    """How many engine processes to run (``--processes`` over the ``processes`` key)."""
    from iii.cluster.supervisor import check_processes_config, process_count

    if given is not None:
        if given != "auto" and not (given.isdigit() and 1 <= int(given) <= 256):
            raise ConfigError(
                f'--processes must be a number from 1 to 256 or "auto", got {given!r}'
            )
        config = attrs.evolve(config, processes=given if given == "auto" else int(given))
    count = process_count(config)
    if count > 1:
        check_processes_config(config, file)
    return count


def _supervise(config: EngineConfig, file: str | None, processes: int, log_level: str) -> ExitCode:
    from iii.cluster.supervisor import supervise

    try:
        code = trio.run(partial(supervise, config, file, processes, log_level=log_level))
    except KeyboardInterrupt:
        return ExitCode.OK
    return ExitCode(code)
