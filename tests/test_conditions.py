"""One reading of a trigger's condition keys for every module (iii/modules/conditions.py)."""

from __future__ import annotations

import pytest

from iii.errors import TriggerRegistrationError
from iii.modules.conditions import CHANGE_CONDITION_KEYS, CONDITION_KEYS, condition_of
from iii.modules.cron import CRON_CONDITION_KEYS, CRON_TRIGGER_ACCESS
from iii.modules.queue import QUEUE_TRIGGER_ACCESS
from iii.modules.rest_api import HTTP_TRIGGER_ACCESS
from iii.modules.state import STATE_TRIGGER_ACCESS


@pytest.mark.parametrize("key", CONDITION_KEYS)
def test_either_key_names_the_condition(key: str) -> None:
    assert condition_of({key: "app::allowed"}, "http") == "app::allowed"


@pytest.mark.parametrize("value", [None, ""])
def test_missing_null_or_empty_means_no_condition(value: object) -> None:
    assert condition_of({}, "queue") is None
    assert condition_of({"condition_function_id": value}, "queue") is None
    assert condition_of(None, "queue") is None


def test_two_keys_naming_different_functions_are_refused_whatever_the_order() -> None:
    for config in (
        {"_condition_path": "a::yes", "condition_function_id": "b::no"},
        {"condition_function_id": "b::no", "_condition_path": "a::yes"},
    ):
        with pytest.raises(TriggerRegistrationError, match="different condition functions"):
            condition_of(config, "http")
    same = {"_condition_path": "a::yes", "condition_function_id": "a::yes"}
    assert condition_of(same, "http") == "a::yes"


def test_cron_also_takes_condition() -> None:
    assert condition_of({"condition": "c::ok"}, "cron", CRON_CONDITION_KEYS) == "c::ok"
    with pytest.raises(TriggerRegistrationError):
        both = {"condition": "c::ok", "_condition_path": "d::ok"}
        condition_of(both, "cron", CRON_CONDITION_KEYS)


def test_change_triggers_read_only_condition_function_id() -> None:
    assert condition_of({"_condition_path": "x::y"}, "state", CHANGE_CONDITION_KEYS) is None


@pytest.mark.parametrize("value", [1, ["a"], {"a": 1}, True])
def test_a_condition_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(TriggerRegistrationError, match="must be a function id"):
        condition_of({"_condition_path": value}, "cron", CRON_CONDITION_KEYS)


def test_every_key_a_module_reads_is_checked_against_the_grant() -> None:
    assert set(HTTP_TRIGGER_ACCESS.function_keys) == set(CONDITION_KEYS)
    assert set(QUEUE_TRIGGER_ACCESS.function_keys) == set(CONDITION_KEYS)
    assert set(CRON_TRIGGER_ACCESS.function_keys) == set(CRON_CONDITION_KEYS)
    assert set(STATE_TRIGGER_ACCESS.function_keys) == set(CHANGE_CONDITION_KEYS)
