"""iii.admission: the connection accounting of a port (pure bookkeeping)."""

from __future__ import annotations

import pytest

from iii.admission import Admission, ConnectionLimits, address_key

STREAM = "modules::stream::StreamModule"


def admission(max_connections: int = 4, max_per_address: int = 2) -> Admission:
    return Admission(
        ConnectionLimits(max_connections=max_connections, max_per_address=max_per_address)
    )


def test_an_address_gets_its_share_and_no_more() -> None:
    ports = admission()
    held = [ports.admit("10.0.0.1"), ports.admit("10.0.0.1")]
    assert all(held)
    assert ports.admit("10.0.0.1") is None
    assert ports.admit("10.0.0.2") is not None  # another address is not affected
    held[0].release()  # type: ignore[union-attr]
    assert ports.admit("10.0.0.1") is not None


def test_handshakes_count_from_accept_and_have_their_own_budget() -> None:
    ports = admission(max_connections=2, max_per_address=10)
    slots = [ports.admit(f"10.0.0.{n}") for n in range(2)]
    assert ports.handshaking == 2 and ports.admit("10.0.0.9") is None
    for slot in slots:
        assert slot is not None and slot.upgrade(credentialed=False)
    # Upgraded connections do not take a handshake's place ...
    assert ports.handshaking == 0 and ports.upgraded == 2
    third = ports.admit("10.0.0.9")
    assert third is not None
    # ... nor the other way round: the upgraded budget is full.
    assert not third.upgrade(credentialed=True)
    third.release()
    assert ports.open == 2


def test_a_credential_takes_a_socket_out_of_its_address_count() -> None:
    ports = admission(max_connections=10, max_per_address=1)
    first = ports.admit("10.0.0.1")
    assert first is not None and ports.admit("10.0.0.1") is None
    assert first.upgrade(credentialed=True)
    second = ports.admit("10.0.0.1")
    assert second is not None
    assert second.upgrade(credentialed=False)  # no credential: keeps its place in the count
    assert ports.admit("10.0.0.1") is None
    assert ports.by_address == {"10.0.0.1": 1}


def test_release_is_idempotent_and_leaves_nothing() -> None:
    ports = admission()
    slot = ports.admit("10.0.0.1")
    assert slot is not None and slot.upgrade(credentialed=False)
    slot.release()
    slot.release()
    assert ports.open == 0 and ports.by_address == {}
    with pytest.raises(RuntimeError):
        slot.upgrade(credentialed=False)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("memory", "memory"),
    ],
)
def test_address_keys(address: str, key: str) -> None:
    assert address_key(address) == key


# -- the config keys ------------------------------------------------------------------------


def test_the_limits_are_config_keys_with_defaults() -> None:
    from iii.config import parse_config

    config = parse_config({})
    assert (config.max_connections, config.max_connections_per_address) == (1024, 256)
    stream = parse_config({"modules": [{"class": STREAM}]}).module_config(STREAM)
    assert (stream.max_connections, stream.max_connections_per_address) == (4096, 128)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"max_connections_per_address": 0},
            "c.yaml: max_connections_per_address: must be at least 1, got 0",
        ),
        (
            {"max_connections_per_address": True},
            "c.yaml: max_connections_per_address: expected an integer, got a boolean",
        ),
        ({"max_connections": -5}, "c.yaml: max_connections: must be at least 1, got -5"),
        (
            {"modules": [{"class": STREAM, "config": {"max_connections_per_address": "9"}}]},
            "c.yaml: modules[0].config.max_connections_per_address: expected an integer, "
            "got a string",
        ),
    ],
)
def test_a_bad_limit_is_a_config_error(raw: dict[str, object], message: str) -> None:
    from iii.config import parse_config
    from iii.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(raw, file="c.yaml")
    assert str(info.value) == message
