"""Every config error exits 2, from ``check-config`` and from ``serve`` alike.

The same bad files go through both commands (``python -m iii`` in a
subprocess, as systemd runs it); each must exit 2 (``RestartPreventExitStatus=2``:
no restart loop) with one line naming the file and the full key path.  Each
file also sets ``host`` to an address no machine has (TEST-NET-1), so a file
``serve`` wrongly accepted would fail to bind and exit 1 at once instead of
running.

Several of these used to pass ``check-config`` and fail only in ``serve``
(exit 1, a crash), or exit 2 without naming the file or the module entry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT

UNBINDABLE = "192.0.2.1"  # RFC 5737: assigned to no host, so a bind fails at once

QUEUE = "modules::queue::QueueModule"
STATE = "modules::state::StateModule"
STREAM = "modules::stream::StreamModule"
CRON = "modules::cron::CronModule"
PUBSUB = "modules::pubsub::PubSubModule"
KV = "modules::kv_server::KvServer"
TELEMETRY = "modules::telemetry::TelemetryModule"


def module(cls, config):
    return {"class": cls, "config": config}


# (id, the file's content beyond host, the key path the message must name, a word of the reason)
BAD_CONFIGS = [
    ("port-false", {"port": False}, "port", "boolean"),
    ("timeout-true", {"invocation_timeout_ms": True}, "invocation_timeout_ms", "boolean"),
    (
        "queue-configs-type",
        {"modules": [module(QUEUE, {"queue_configs": {"orders": {"type": "weird"}}})]},
        "modules[0].config.queue_configs.orders.type",
        "'fifo'",
    ),
    (
        "queue-configs-concurrency-bool",
        {"modules": [module(QUEUE, {"queue_configs": {"orders": {"concurrency": True}}})]},
        "modules[0].config.queue_configs.orders.concurrency",
        "boolean",
    ),
    (
        "queue-adapter-unknown-key",
        {
            "modules": [
                module(
                    QUEUE,
                    {
                        "adapter": {
                            "class": "modules::queue::BuiltinQueueAdapter",
                            "config": {"max_atempts": 5},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config",
        "max_atempts",
    ),
    (
        "queue-adapter-max-attempts",
        {
            "modules": [
                module(STATE, {}),
                module(
                    QUEUE,
                    {
                        "adapter": {
                            "class": "modules::queue::RedisAdapter",
                            "config": {"max_attempts": 0},
                        }
                    },
                ),
            ]
        },
        "modules[1].config.adapter.config.max_attempts",
        "at least 1",
    ),
    (
        "rabbitmq-queue-mode",
        {
            "modules": [
                module(
                    QUEUE,
                    {
                        "adapter": {
                            "class": "modules::queue::RabbitMQAdapter",
                            "config": {"queue_mode": "lifo"},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config.queue_mode",
        "'fifo'",
    ),
    (
        "state-adapter-unknown-class",
        {"modules": [module(STATE, {"adapter": {"class": "modules::state::adapters::Nope"}})]},
        "modules[0].config.adapter.class",
        "Nope",
    ),
    (
        "state-adapter-ignored-key-now-refused",
        {"modules": [module(STATE, {"adapter": {"class": "embedded", "config": {"path": "x"}}})]},
        "modules[0].config.adapter.config",
        "path",
    ),
    (
        "stream-redis-url",
        {
            "modules": [
                module(
                    STREAM,
                    {
                        "adapter": {
                            "class": "modules::stream::adapters::RedisAdapter",
                            "config": {"redis_url": "http://localhost"},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config.redis_url",
        "redis://",
    ),
    (
        "cron-lock-ttl-bool",
        {
            "modules": [
                module(
                    CRON,
                    {
                        "adapter": {
                            "class": "modules::cron::KvCronAdapter",
                            "config": {"lock_ttl_ms": False},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config.lock_ttl_ms",
        "boolean",
    ),
    (
        "pubsub-adapter-config-list",
        {
            "modules": [
                module(
                    PUBSUB,
                    {
                        "adapter": {
                            "class": "modules::pubsub::RedisAdapter",
                            "config": ["redis://localhost"],
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config",
        "mapping",
    ),
    (
        "bridge-url-not-ws",  # was found only when serve opened the adapter
        {
            "modules": [
                module(
                    STATE,
                    {
                        "adapter": {
                            "class": "modules::state::adapters::Bridge",
                            "config": {"bridge_url": "http://backend:49134"},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config.bridge_url",
        "ws://",
    ),
    (
        "bridge-queue-call-timeout",
        {
            "modules": [
                module(
                    QUEUE,
                    {
                        "adapter": {
                            "class": "modules::queue::adapters::Bridge",
                            "config": {"call_timeout_ms": 0},
                        }
                    },
                )
            ]
        },
        "modules[0].config.adapter.config.call_timeout_ms",
        "at least 1",
    ),
    (
        "kv-server-unknown-key",
        {"modules": [module(KV, {"store_metod": "file_based"})]},
        "modules[0].config",
        "store_metod",
    ),
    (
        "telemetry-unknown-key",
        {"modules": [module(TELEMETRY, {"enabeld": False})]},
        "modules[0].config",
        "enabeld",
    ),
    (
        "two-stores-one-directory",
        {
            "modules": [
                module(KV, {"store_method": "file_based", "file_path": "data"}),
                module(
                    STATE,
                    {
                        "adapter": {
                            "class": "modules::state::adapters::KvStore",
                            "config": {"store_method": "file_based", "file_path": "./data"},
                        }
                    },
                ),
            ]
        },
        "modules[1].config.adapter.config.file_path",
        "modules[0].config.file_path",
    ),
]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iii", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    ("content", "key", "reason"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_a_bad_config_exits_2_naming_the_file_and_the_key(tmp_path, command, content, key, reason):
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump({"host": UNBINDABLE, **content}))
    args = ["check-config", str(file)] if command == "check-config" else ["serve", "-c", str(file)]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"iii: config error: {file}: {key}: "), lines[0]
    assert reason in lines[0]


def test_a_tls_pair_that_does_not_load_exits_2_from_both_commands(tmp_path):
    # Both files exist (which is all check-config looked at), but they hold no PEM.
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    file = tmp_path / "config.yaml"
    file.write_text(
        yaml.safe_dump(
            {"host": UNBINDABLE, "tls": {"cert": "cert.pem", "key": "key.pem"}, "modules": []}
        )
    )
    for args in (["check-config", str(file)], ["serve", "-c", str(file)]):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"iii: config error: {file}: tls: cannot load"), (
            result.stderr
        )


def test_the_sample_of_a_good_file_is_accepted(tmp_path):
    # The same shapes, right: upstream's class names, the embedded alias, our keys.
    file = tmp_path / "config.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "host": UNBINDABLE,
                "modules": [
                    module(
                        QUEUE,
                        {
                            "adapter": {"class": "embedded", "config": {"max_attempts": 5}},
                            "queue_configs": {"orders": {"type": "fifo", "max_retries": 0}},
                        },
                    ),
                    module(
                        STATE,
                        {
                            "adapter": {
                                "class": "modules::state::adapters::KvStore",
                                "config": {"store_method": "file_based", "file_path": "s"},
                            }
                        },
                    ),
                    module(KV, {"store_method": "file_based", "file_path": "kv"}),
                    module(TELEMETRY, {"enabled": False}),
                ],
            }
        )
    )
    result = run("check-config", str(file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(run("config", "show", "-c", str(file), cwd=tmp_path).stdout)
    queue = next(m for m in shown["modules"] if m["class"] == QUEUE)["config"]
    assert queue["adapter"]["class"] == "modules::queue::BuiltinQueueAdapter"  # upstream's name
    assert queue["adapter"]["config"]["max_attempts"] == 5
    assert queue["adapter"]["config"]["backoff_ms"] == 1000  # every default filled in
