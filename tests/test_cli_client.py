"""The client commands against a real engine process (issue 11, part C).

``python -m iii trigger | functions | workers | triggers`` run as users run
them, in a subprocess, against ``python -m iii serve`` (:func:`running_engine`)
with raw protocol workers over real sockets and, once, the official 0.25 SDK.
The failures are covered too: an unknown function, a function that fails, a
bad payload, no engine, a refused token, TLS trust, and a call that never
answers.

Exit codes (iii.cli.ExitCode): 0 ok, 2 usage, 4 the call answered an error,
5 the engine could not be reached, 6 no answer within ``--timeout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trustme

from tests.support import reserve_port, running_engine, start_sdk_worker
from tests.support.cli import NO_ANSWER, run_cli, serving_worker

OK, USAGE, CALL_FAILED, UNREACHABLE, TIMEOUT = 0, 2, 4, 5, 6
NO_MODULES: dict[str, Any] = {"modules": []}


async def echo(data: Any) -> Any:
    return {"result": data}


async def fail(data: Any) -> Any:
    return {"error": {"code": "invocation_failed", "message": "boom: the input was wrong"}}


async def never(data: Any) -> Any:
    return NO_ANSWER


def without_caller(value: Any) -> Any:
    """An echoed object payload, less the ``_caller_worker_id`` the engine adds."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "_caller_worker_id"}
    return value


# -- trigger: payloads and output --------------------------------------------------------


async def test_trigger_prints_the_result_as_json(tmp_path: Path) -> None:
    async with running_engine(tmp_path, dict(NO_MODULES)) as engine:
        async with serving_worker(engine.port, {"demo::echo": echo}):
            url = engine.url
            done = await run_cli(
                "trigger", "demo::echo", "--payload", '{"a": 1, "s": "héllo"}', "--url", url
            )
            assert done.code == OK, done
            assert without_caller(done.json) == {"a": 1, "s": "héllo"}
            assert done.stderr == ""

            # Upstream's forms: key=value pairs over a --json object, --address/--port.
            done = await run_cli(
                "trigger", "demo::echo", "--json", '{"a": 1, "b": 2}', "a=10", "name=alice",
                "--address", "127.0.0.1", "--port", str(engine.port),
            )  # fmt: skip
            assert done.code == OK, done
            assert without_caller(done.json) == {"a": 10, "b": 2, "name": "alice"}

            # From a file, from stdin, and no payload at all ({} as upstream).
            payload_file = tmp_path / "payload.json"
            payload_file.write_text("[1, 2, 3]")
            done = await run_cli(
                "trigger", "demo::echo", "--payload-file", str(payload_file), "--url", url
            )
            assert (done.code, done.json) == (OK, [1, 2, 3]), done
            done = await run_cli(
                "trigger", "demo::echo", "-", "--url", url, stdin=b'{"from": "stdin"}'
            )
            assert (done.code, without_caller(done.json)) == (OK, {"from": "stdin"}), done
            done = await run_cli("trigger", "demo::echo", env={"III_URL": url})
            assert (done.code, without_caller(done.json)) == (OK, {}), done

            # Upstream's alias, and its first version's --function-id.
            done = await run_cli("t", "demo::echo", "n=1", "--url", url)
            assert (done.code, without_caller(done.json)) == (OK, {"n": 1}), done
            done = await run_cli("trigger", "--function-id", "demo::echo", "n=2", "--url", url)
            assert (done.code, without_caller(done.json)) == (OK, {"n": 2}), done

            # A null result is printed as JSON null; an engine function works the same.
            done = await run_cli("trigger", "demo::echo", "--payload", "null", "--url", url)
            assert (done.code, done.stdout) == (OK, "null\n"), done
            done = await run_cli("trigger", "engine::functions::list", "--url", url)
            assert done.code == OK, done
            assert "demo::echo" in [f["function_id"] for f in done.json["functions"]]


async def test_trigger_answers_beyond_the_legacy_frame_limit(tmp_path: Path) -> None:
    """The engine keeps Python workers to 1 MiB frames unless they say otherwise
    (0.4.1 takes no more): the command says so before its call."""
    large = {"features": ["large-messages.v1"]}
    async with running_engine(tmp_path, dict(NO_MODULES)) as engine:
        async with serving_worker(engine.port, {"demo::echo": echo}, metadata=large):
            payload_file = tmp_path / "big.json"
            text = "x" * (3 * 1024 * 1024)
            payload_file.write_bytes(orjson.dumps({"text": text}))
            done = await run_cli(
                "trigger", "demo::echo", "--payload-file", str(payload_file), "--url", engine.url
            )
            assert done.code == OK, done.stderr
            assert without_caller(done.json) == {"text": text}


async def test_trigger_void_fires_and_forgets(tmp_path: Path) -> None:
    async with running_engine(tmp_path, dict(NO_MODULES)) as engine:
        async with serving_worker(engine.port, {"demo::sink": never}) as worker:
            done = await run_cli(
                "trigger", "demo::sink", "--void", "--payload", '{"v": 7}', "--url", engine.url
            )
            assert (done.code, done.stdout) == (OK, ""), done
            # The command has exited: the call still reaches the worker.
            with trio.fail_after(10):
                await worker.called.wait()
            function_id, data = worker.calls[0]
            assert function_id == "demo::sink" and without_caller(data) == {"v": 7}


# -- trigger: failures ----------------------------------------------------------------


async def test_trigger_failures_exit_with_their_code(tmp_path: Path) -> None:
    config = {"modules": [], "invocation_timeout_ms": 600_000}
    async with running_engine(tmp_path, config) as engine:
        async with serving_worker(
            engine.port, {"demo::fail": fail, "demo::never": never, "demo::echo": echo}
        ) as worker:
            url = engine.url
            done = await run_cli("trigger", "nope::missing", "--url", url)
            assert done.code == CALL_FAILED and done.stdout == "", done
            assert "function_not_found" in done.stderr and "nope::missing" in done.stderr

            done = await run_cli("trigger", "demo::fail", "--url", url)
            assert done.code == CALL_FAILED and done.stdout == "", done
            assert "invocation_failed: boom: the input was wrong" in done.stderr

            # Never answered: the command gives up after --timeout.
            done = await run_cli("trigger", "demo::never", "--timeout", "1", "--url", url)
            assert done.code == TIMEOUT and done.stdout == "", done
            assert "no answer" in done.stderr and "demo::never" in done.stderr

            # Bad payloads are usage errors, found before anything is sent.
            calls_before = len(worker.calls)
            for args, stdin, expected in (
                (("--payload", "{not json"), b"", "--payload: invalid JSON"),
                (("--json", "[1,"), b"", "--json: invalid JSON"),
                (("--payload-file", str(tmp_path / "absent.json")), b"", "absent.json"),
                (("-",), b"{oops", "stdin: invalid JSON"),
                (("--payload", "[1]", "a=1"), b"", "must be an object"),
                (("novalue",), b"", "expected key=value"),
                (("--payload", "{}", "--payload-file", "f.json"), b"", "one of"),
            ):
                done = await run_cli("trigger", "demo::echo", *args, "--url", url, stdin=stdin)
                assert done.code == USAGE and done.stdout == "", (args, done)
                assert expected in done.stderr, (args, done)
            assert len(worker.calls) == calls_before

            # Bad connection options are usage errors too.
            for args in (
                ("--url", "http://127.0.0.1:1"),
                ("--url", "ws://127.0.0.1:99999"),
                ("--url", url, "--address", "127.0.0.1"),
                ("--timeout", "0", "--url", url),
                ("--token", "two\nlines", "--url", url),
            ):
                done = await run_cli("trigger", "demo::echo", *args)
                assert done.code == USAGE, (args, done)
            assert len(worker.calls) == calls_before


async def test_trigger_without_an_engine_is_unreachable() -> None:
    port = reserve_port()  # nothing listens there
    for command in (("trigger", "demo::echo"), ("functions",), ("workers", "--json")):
        done = await run_cli(*command, "--url", f"ws://127.0.0.1:{port}")
        assert done.code == UNREACHABLE and done.stdout == "", done
        assert f"ws://127.0.0.1:{port}" in done.stderr and "cannot connect" in done.stderr


# -- auth and TLS ---------------------------------------------------------------------

TOKEN = "cli-token-0123456789abcdef"
LIMITED = "cli-limited-0123456789abcdef"


async def test_token_from_flag_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("III_TEST_CLI_TOKEN", TOKEN)
    monkeypatch.setenv("III_TEST_CLI_LIMITED", LIMITED)
    config = {
        "modules": [],
        "auth": {
            "tokens": [
                {"name": "ops", "env": "III_TEST_CLI_TOKEN"},
                {"name": "limited", "env": "III_TEST_CLI_LIMITED", "invoke": ["demo::*"]},
            ]
        },
    }
    async with running_engine(tmp_path, config) as engine:
        url = engine.url
        done = await run_cli("functions", "--url", url)
        assert done.code == UNREACHABLE, done
        assert "401" in done.stderr and "III_TOKEN" in done.stderr
        done = await run_cli("functions", "--url", url, "--token", "wrong-token-0123456789")
        assert done.code == UNREACHABLE and "401" in done.stderr, done

        done = await run_cli("functions", "--json", "--url", url, "--token", TOKEN)
        assert (done.code, done.json) == (OK, []), done
        done = await run_cli(
            "trigger", "engine::functions::list", "--url", url, env={"III_TOKEN": TOKEN}
        )
        assert (done.code, done.json) == (OK, {"functions": []}), done

        # The token's allow-list still applies: refused calls are call errors.
        done = await run_cli("functions", "--url", url, env={"III_TOKEN": LIMITED})
        assert done.code == CALL_FAILED and "forbidden" in done.stderr, done


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}
    cert.private_key_and_cert_chain_pem.write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


async def test_wss_trusts_the_system_store_or_ssl_cert_file(
    tmp_path: Path, tls_files: dict[str, str]
) -> None:
    config = {
        "modules": [],
        "tls": {"cert": tls_files["cert"], "key": tls_files["key"]},
        "handshake_timeout_ms": 500,
    }
    async with running_engine(tmp_path, config) as engine:
        wss = f"wss://localhost:{engine.port}"
        done = await run_cli(
            "trigger",
            "engine::functions::list",
            "--url",
            wss,
            env={"SSL_CERT_FILE": tls_files["ca"]},
        )
        assert (done.code, done.json) == (OK, {"functions": []}), done
        # The test CA is not in the system store.
        done = await run_cli("functions", "--url", wss)
        assert done.code == UNREACHABLE and "certificate" in done.stderr, done
        # Plain ws:// to the TLS port: the engine drops it unanswered.
        done = await run_cli("functions", "--url", engine.url)
        assert done.code == UNREACHABLE and "WebSocket upgrade" in done.stderr, done


# -- functions, workers, triggers ------------------------------------------------------


async def test_lists_as_tables_and_json(tmp_path: Path) -> None:
    config = {"modules": [{"class": "modules::pubsub::PubSubModule"}]}
    trigger = {
        "id": "orders-sub",
        "trigger_type": "subscribe",
        "function_id": "demo::echo",
        "config": {"topic": "orders"},
    }
    async with running_engine(tmp_path, config) as engine:
        async with serving_worker(
            engine.port,
            {"demo::echo": echo, "demo::fail": fail},
            triggers=[trigger],
            descriptions={"demo::echo": "Echo the input back"},
            metadata={
                "name": "billing-worker",
                "runtime": "python",
                "version": "1.2.3",
                "pid": 4242,
            },
        ) as worker:
            url = engine.url
            done = await run_cli("functions", "--url", url)
            assert done.code == OK, done
            lines = done.stdout.splitlines()
            assert lines[0].split() == ["FUNCTION_ID", "DESCRIPTION"]
            assert lines[1].split(None, 1) == ["demo::echo", "Echo the input back"]
            assert lines[2].split() == ["demo::fail"]
            assert lines[3].split()[0] == "publish"
            assert "engine::" not in done.stdout
            done = await run_cli("functions", "--include-internal", "--url", url)
            assert "engine::functions::list" in done.stdout
            done = await run_cli("functions", "--json", "--url", url)
            assert done.code == OK, done
            # (PubSubModule's own "publish" is no engine:: function.)
            ids = sorted(f["function_id"] for f in done.json)
            assert ids == ["demo::echo", "demo::fail", "publish"]

            done = await run_cli("triggers", "--url", url)
            assert done.code == OK, done
            lines = done.stdout.splitlines()
            assert lines[0].split() == ["ID", "TYPE", "FUNCTION_ID", "CONFIG"]
            assert lines[1].split() == [
                "orders-sub",
                "subscribe",
                "demo::echo",
                '{"topic":"orders"}',
            ]
            done = await run_cli("triggers", "--json", "--url", url)
            assert done.json == [trigger]

            # The command's own connection is not one of the workers listed.
            done = await run_cli("workers", "--url", url)
            assert done.code == OK, done
            lines = done.stdout.splitlines()
            assert lines[0].split()[:5] == ["ID", "NAME", "RUNTIME", "VERSION", "PID"]
            assert len(lines) == 2, done.stdout
            row = lines[1].split()
            assert row[:6] == [
                worker.raw.worker_id,
                "billing-worker",
                "python",
                "1.2.3",
                "4242",
                "2",
            ]
            done = await run_cli("workers", "--json", "--url", url)
            assert [w["name"] for w in done.json] == ["billing-worker"]
            assert done.json[0]["functions"] == ["demo::echo", "demo::fail"]


# -- the official SDK ---------------------------------------------------------------------

WORKER_025 = """
import sys
from iii import register_worker, InitOptions

def divide(data):
    return {"q": data["a"] / data["b"]}

iii = register_worker(sys.argv[1], InitOptions(worker_name="calc025", otel={"enabled": False}))
iii.register_function("calc::divide", divide, description="a / b")
print("READY", flush=True)
sys.stdin.readline()
iii.shutdown()
"""


@pytest.mark.sdk
async def test_sdk_025_worker_driven_from_the_shell(tmp_path: Path) -> None:
    async with running_engine(tmp_path, dict(NO_MODULES)) as engine:
        async with start_sdk_worker("0.25.0", WORKER_025, url=engine.url) as worker:
            await worker.wait_for("READY", timeout=40)
            with trio.fail_after(30):
                while True:
                    done = await run_cli("functions", "--json", "--url", engine.url)
                    if "calc::divide" in [f["function_id"] for f in done.json]:
                        break
                    await trio.sleep(0.2)
            done = await run_cli("trigger", "calc::divide", "a=7", "b=2", "--url", engine.url)
            assert (done.code, done.json) == (OK, {"q": 3.5}), done
            done = await run_cli("trigger", "calc::divide", "a=7", "b=0", "--url", engine.url)
            assert done.code == CALL_FAILED and "division by zero" in done.stderr, done
            # The SDK's stack trace follows, each line indented.
            assert "  | Traceback" in done.stderr, done
            done = await run_cli("workers", "--url", engine.url)
            assert "calc025" in done.stdout, done
