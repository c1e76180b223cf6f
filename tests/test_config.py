"""Config loading: upstream shape, env expansion, readable errors, TOML, defaults."""

from __future__ import annotations

import pytest

from iii.config import dump_config, expand_env, load_config, parse_config
from iii.errors import ConfigError
from iii.modules import DEFAULT_MODULES


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_gives_the_default_module_set():
    config = load_config(None)
    classes = [m.class_name for m in config.modules]
    assert classes[: len(DEFAULT_MODULES)] == DEFAULT_MODULES
    assert (
        "modules::worker::WorkerModule" in classes
        and "modules::telemetry::TelemetryModule" in classes
    )
    assert config.port == 49134 and config.host == "127.0.0.1"


def test_upstream_shape_and_env_expansion(tmp_path):
    path = write(
        tmp_path,
        """
port: ${III_TEST_PORT:4000}
# a comment with ${UNSET_IN_A_COMMENT} is never expanded
invocation_timeout_ms: ${III_TEST_TIMEOUT}
host: "${III_TEST_HOST:0.0.0.0}:x"
modules:
  - class: modules::worker::WorkerModule
    config:
      functions_debounce_ms: ${III_TEST_DEBOUNCE:50}
""",
    )
    config = load_config(path, env={"III_TEST_TIMEOUT": "1500"})
    assert config.port == 4000  # one reference: takes the type of the value
    assert config.invocation_timeout_ms == 1500 and config.invocation_timeout == 1.5
    assert config.host == "0.0.0.0:x"  # embedded reference stays a string
    assert config.module_config("modules::worker::WorkerModule").functions_debounce_ms == 50


def test_unset_variable_names_variable_key_and_file(tmp_path):
    path = write(
        tmp_path,
        "modules:\n  - class: modules::worker::WorkerModule\n    config:\n      functions_debounce_ms: ${NOPE_NOT_SET}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert (
        str(path) in message
        and "NOPE_NOT_SET" in message
        and "modules[0].config.functions_debounce_ms" in message
    )


@pytest.mark.parametrize(
    "raw, typed",
    [
        # YAML 1.2 core scalars, not PyYAML's 1.1 ones:
        ("yes", "yes"),
        ("on", "on"),
        ("no", "no"),
        ("off", "off"),
        ("y", "y"),
        ("12:30", "12:30"),
        ("1_000", "1_000"),
        ("010", 10),
        ("0o17", 15),
        ("0x1F", 31),
        ("-3", -3),
        ("49134", 49134),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        (".inf", float("inf")),
        ("", ""),
        ("secret", "secret"),
        ("1.2.3", "1.2.3"),
    ],
)
def test_a_lone_reference_takes_the_yaml_1_2_type_of_its_value(raw, typed):
    value = expand_env({"a": "${V}", "b": "x${V}"}, env={"V": raw})
    assert value["a"] == typed and type(value["a"]) is type(typed)
    assert value["b"] == f"x{raw}"  # inside a longer string: always text


def test_expansion_cannot_inject_yaml():
    value = expand_env({"a": "${EVIL}"}, env={"EVIL": "x\nmodules: []"})
    assert value == {"a": "x\nmodules: []"}


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("prot: 1\n", None, "unknown key: prot"),
        ("port: abc\n", "port", "expected an integer"),
        ("modules:\n  - class: modules::nope::Nope\n", "modules[0].class", "unknown module class"),
        (
            "modules:\n  - class: modules::worker::WorkerModule\n    config: {debounce: 1}\n",
            "modules[0].config",
            "unknown key: debounce",
        ),
        (
            "modules:\n  - class: modules::worker::WorkerModule\n  - class: modules::worker::WorkerModule\n",
            "modules[1].class",
            "listed twice",
        ),
        ("modules:\n  - klass: x\n", "modules[0]", "unknown key: klass"),
        ("modules: 3\n", "modules", "expected a list"),
        ("- a\n- b\n", None, "top level must be a mapping"),
        ("port: [\n", None, "invalid YAML"),
    ],
)
def test_errors_name_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.file == str(path)
    assert error.key == key
    assert reason in error.reason


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_toml_with_the_same_schema(tmp_path):
    path = write(
        tmp_path,
        'port = 5000\n[[modules]]\nclass = "modules::worker::WorkerModule"\n[modules.config]\nfunctions_debounce_ms = 10\n',
        "config.toml",
    )
    config = load_config(path)
    assert config.port == 5000
    assert config.module_config("modules::worker::WorkerModule").functions_debounce_ms == 10


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
@pytest.mark.parametrize(
    "modules",
    [
        [{"class": "modules::worker::WorkerModule"}],
        None,  # the default set, every adapter block filled in
        [
            {
                "class": "modules::queue::QueueModule",
                "config": {
                    "adapter": {"class": "modules::queue::RabbitMQAdapter"},
                    "queue_configs": {"orders": {"type": "fifo"}},
                },
            },
            {"class": "modules::state::StateModule", "config": {"adapter": {"class": "embedded"}}},
        ],
    ],
    ids=["worker", "defaults", "adapters"],
)
def test_shown_config_loads_back_to_the_same(tmp_path, fmt, modules):
    raw = {"port": 4100} if modules is None else {"port": 4100, "modules": modules}
    original = parse_config(raw)
    path = write(tmp_path, dump_config(original, fmt), f"shown.{fmt}")
    assert load_config(path) == original


def test_port_zero_means_default():
    assert parse_config({"port": 0}).port == 49134


@pytest.mark.parametrize("value", [False, True])
def test_a_boolean_is_not_a_port(value):
    # ``port: false`` was read as 0 (False == 0), which means the default port.
    with pytest.raises(ConfigError) as info:
        parse_config({"port": value}, file="f.yaml")
    assert str(info.value) == "f.yaml: port: expected an integer, got a boolean"


@pytest.mark.parametrize(
    ("config", "key", "reason"),
    [
        ([1, 2], "modules[0].config", "expected a mapping, got a list"),
        ({"queue_configs": {"orders": 5}}, "modules[0].config.queue_configs.orders", "a mapping"),
        (
            {"queue_configs": {"a.b": {"max_retries": -1}}},
            "modules[0].config.queue_configs.a.b.max_retries",
            "must be at least 0, got -1",
        ),
        ({"adapter": "embedded"}, "modules[0].config.adapter", "expected a mapping"),
        ({"adapter": {"config": {}}}, "modules[0].config.adapter.class", "required"),
        ({"adapter": {"class": "embedded", "extra": 1}}, "modules[0].config.adapter", "extra"),
    ],
)
def test_module_blocks_name_the_failing_key(config, key, reason):
    modules = [{"class": "modules::queue::QueueModule", "config": config}]
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": modules}, file="f.yaml")
    assert (info.value.file, info.value.key) == ("f.yaml", key)
    assert reason in info.value.reason


# -- hostile files (issue 10 row 13): each is a ConfigError naming the file, fast and small --


def billion_laughs(levels: int = 10, fan_out: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * fan_out)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_before_it_is_expanded(tmp_path):
    path = write(tmp_path, billion_laughs())  # 10**9 strings once expanded
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert "alias" in info.value.reason and "expand" in info.value.reason


def test_a_few_aliases_are_still_fine(tmp_path):
    path = write(
        tmp_path,
        "invocation_timeout_ms: &t 1500\n"
        "handshake_timeout_ms: *t\n"
        "modules:\n  - &w {class: modules::worker::WorkerModule}\n",
    )
    config = load_config(path)
    assert config.invocation_timeout_ms == config.handshake_timeout_ms == 1500


def test_a_recursive_alias_is_an_error(tmp_path):
    path = write(tmp_path, "modules: &a [*a]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and "refers to itself" in info.value.reason


@pytest.mark.parametrize(
    "name, text",
    [
        ("deep.yaml", "x: " + "[" * 20_000 + "]" * 20_000 + "\n"),
        ("deep_map.yaml", "x: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"),
        ("deep.toml", "x = " + "[" * 20_000 + "]" * 20_000 + "\n"),
        ("deep_table.toml", "x = " + "{a = " * 20_000 + "1" + "}" * 20_000 + "\n"),
        # Each anchor is shallow; expanded, d is 71 levels deep.
        (
            "shallow_aliases.yaml",
            "a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: &b [*a]\nc: &c [*b, *b]\n"
            "d: " + "[" * 27 + "*c" + "]" * 27 + "\n",
        ),
    ],
)
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, name, text):
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert "nested" in info.value.reason and "deep" in info.value.reason


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("port: 4000\nhost: x\nport: 5000\n", "port", 3),
        (
            "modules:\n  - class: modules::worker::WorkerModule\n    config:\n"
            "      functions_debounce_ms: 1\n      functions_debounce_ms: 2\n",
            "modules[0].config.functions_debounce_ms",
            5,
        ),
        ("auth: {tokens: [], tokens: []}\n", "auth.tokens", 1),
    ],
)
def test_a_duplicate_key_is_an_error_naming_the_key_and_line(tmp_path, text, key, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and info.value.key == key
    assert "duplicate key" in info.value.reason and f"line {line}" in info.value.reason


def test_a_merge_key_is_not_a_duplicate(tmp_path):
    path = write(
        tmp_path,
        "modules:\n  - class: modules::worker::WorkerModule\n"
        "    config: {<<: {functions_debounce_ms: 5}, functions_debounce_ms: 7}\n",
    )
    config = load_config(path).module_config("modules::worker::WorkerModule")
    assert config.functions_debounce_ms == 7


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("huge_int.yaml", b"port: " + b"9" * 5000 + b"\n", "invalid YAML"),
        ("huge_int.toml", b"port = " + b"9" * 5000 + b"\n", "invalid TOML"),
        ("bad_date.yaml", b"port: 2020-13-45\n", "invalid YAML"),
        ("latin1.yaml", b"host: \xff\xfe\n", "UTF-8"),
        ("big.yaml", b"# padding\n" * 200_000, "larger than"),
        ("empty_int.yaml", b"port: !!int \n", "invalid YAML"),
        ("bad_bool.yaml", b"port: !!bool x\n", "invalid YAML"),
        ("nul.yaml", b"port: 1\x00\n", "invalid YAML"),
        ("null_key.yaml", b"? \n: 1\n", "unknown key: None"),
    ],
)
def test_files_that_used_to_crash_the_loader_are_config_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and reason in str(info.value)
    assert "\n" not in str(info.value)  # one line: FILE: key: reason


@pytest.mark.parametrize("key", ["channel_buffer_bytes", "channels_max_bytes", "max_channels"])
def test_channel_limits_are_positive_integers(tmp_path, key):
    assert getattr(load_config(write(tmp_path, f"{key}: 7\n")), key) == 7
    cases = [("0", "must be at least 1, got 0"), ("true", "expected an integer, got a boolean")]
    for bad, reason in cases:
        path = write(tmp_path, f"{key}: {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {key}: {reason}"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("port: 70000\n", "port: must be between 0 and 65535, got 70000"),  # used to wrap to 4464
        ("port: -5\n", "port: must be between 0 and 65535, got -5"),
        ("invocation_timeout_ms: -1\n", "invocation_timeout_ms: must be at least 1, got -1"),
        ("heartbeat_interval_ms: 0\n", "heartbeat_interval_ms: must be at least 1, got 0"),
        ("shutdown_grace_ms: -1\n", "shutdown_grace_ms: must be at least 0, got -1"),
        ("max_message_size: 0\n", "max_message_size: must be at least 1, got 0"),
        ("send_queue_size: -1\n", "send_queue_size: must be at least 1, got -1"),
        ("max_connections: 0\n", "max_connections: must be at least 1, got 0"),
    ],
)
def test_engine_numbers_out_of_range_are_config_errors(tmp_path, text, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {reason}"
    assert load_config(write(tmp_path, "shutdown_grace_ms: 0\nport: 65535\n")).port == 65535


@pytest.mark.parametrize("key", ["max_inbound_bytes", "inbound_wait_timeout_ms"])
def test_inbound_limits_are_positive_integers(tmp_path, key):
    assert getattr(load_config(write(tmp_path, f"{key}: 67108864\n")), key) == 64 * 1024 * 1024
    cases = [("0", "must be at least 1, got 0"), ("true", "expected an integer, got a boolean")]
    for bad, reason in cases:
        path = write(tmp_path, f"{key}: {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {key}: {reason}"


def test_max_inbound_bytes_holds_at_least_one_message(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.max_inbound_bytes == 256 * 1024 * 1024 and config.inbound_wait_timeout == 15.0
    path = write(tmp_path, "max_message_size: 2000\nmax_inbound_bytes: 1000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: max_inbound_bytes: must be at least max_message_size (2000), got 1000"
    )
