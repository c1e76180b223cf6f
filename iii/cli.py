"""The command line: ``serve``, ``check-config`` and ``config show``.

Exit codes (documented for systemd's ``RestartPreventExitStatus=2``):

* 0: clean shutdown;
* 1: the engine crashed (a module failed); the reason is printed on one line;
* 2: a config or usage error (the file, the key and the reason are printed);
* 3: an adapter's backend was unreachable at start.

Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import sys
from pathlib import Path

import trio

from iii import __version__
from iii.config import EngineConfig, dump_config, load_config
from iii.errors import AdapterUnavailableError, ConfigError
from iii.log import LOG_FORMAT, LineFormatter, clean

__all__ = ["main", "ExitCode"]

log = logging.getLogger("iii")


class ExitCode(enum.IntEnum):
    OK = 0
    CRASH = 1
    CONFIG = 2
    ADAPTER_UNREACHABLE = 3


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


def _serve(config: EngineConfig) -> ExitCode:
    # serve_engine, plus READY/WATCHDOG/STOPPING when run by systemd (Type=notify).
    from iii.systemd import serve_with_systemd

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
        if isinstance(leaf, OSError) and leaf.errno is not None:
            print(f"iii: cannot start: {leaf}", file=sys.stderr)
            return ExitCode.CRASH
        log.debug("engine crashed", exc_info=exc)
        print(f"iii: engine crashed: {type(leaf).__name__}: {clean(str(leaf))}", file=sys.stderr)
        return ExitCode.CRASH
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iii", description="iii orchestration engine")
    parser.add_argument("--version", action="version", version=f"iii {__version__}")
    parser.add_argument(
        "--log-level", default=os.environ.get("III_LOG_LEVEL", "info"), help="debug, info, warning, error"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the engine")
    serve.add_argument("-c", "--config", help="config file (YAML or TOML); default ./config.yaml if present")
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

    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if args.command == "check-config":
            load_config(args.file)
            print(f"{args.file}: ok")
            return ExitCode.OK
        if args.command in ("config", "print-config"):
            config = load_config(_config_path(args.config))
            sys.stdout.write(dump_config(config, args.format))
            return ExitCode.OK
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"iii: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return _serve(config)
