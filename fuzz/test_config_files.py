"""Config files: whatever bytes a file holds, loading it gives a config or a ConfigError.

Never another exception (which ``iii check-config`` / ``iii serve`` would turn
into a traceback and exit 1, the code systemd restarts forever on).  Texts are
built from YAML/TOML punctuation, anchors, aliases, tags and scalars that
PyYAML and tomllib treat specially, plus arbitrary bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from iii.config import EngineConfig, load_config
from iii.errors import ConfigError

_YAML_PIECES = [
    "port: ",
    "host: ",
    "modules:",
    "\n",
    "  ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    ": ",
    "? ",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "<<: ",
    "!!binary ",
    "!!int ",
    "!!python/object ",
    "!!set ",
    "2020-13-45",
    "1e999",
    "9" * 5000,
    "0x",
    "~",
    "'",
    '"',
    "#",
    "---\n",
    "...\n",
    "|\n",
    ">\n",
    "${PORT}",
    "${X:1}",
    "class: modules::worker::WorkerModule",
    "config: ",
    "\t",
    "\x00",
    "\ufeff",
]
_TOML_PIECES = [
    "port = ",
    "host = ",
    "[modules]",
    "[[modules]]",
    "\n",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    '"',
    "'",
    "'''",
    '"""',
    "1979-05-27T07:32:00Z",
    "9" * 5000,
    "inf",
    "nan",
    "0x",
    "a.b",
    "#",
    "\x00",
]


def _texts(pieces: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.lists(st.sampled_from(pieces), max_size=40).map(lambda parts: "".join(parts).encode()),
        st.binary(max_size=200),
    )


def _load(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"config{suffix}"
        path.write_bytes(content)
        try:
            assert isinstance(load_config(path, env={"PORT": "5000"}), EngineConfig)
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}"), exc
            assert "\n" not in str(exc)


@given(_texts(_YAML_PIECES))
def test_any_yaml_file_loads_or_is_a_config_error(content):
    _load(content, ".yaml")


@given(_texts(_TOML_PIECES))
def test_any_toml_file_loads_or_is_a_config_error(content):
    _load(content, ".toml")
