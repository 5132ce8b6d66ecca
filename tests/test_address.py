"""The learner's two addresses, as both jobs read them."""

from __future__ import annotations

import pytest

from impala import address
from impala.config import ConfigError


def test_parameters_are_on_the_next_port():
    assert address.split_address("tcp://10.0.0.5:5000") == ("tcp://10.0.0.5", 5000)
    assert address.learner_addresses("tcp://10.0.0.5:5000") == ("tcp://10.0.0.5:5000", "tcp://10.0.0.5:5001")
    assert address.learner_addresses("tcp://[::1]:7000") == ("tcp://[::1]:7000", "tcp://[::1]:7001")


@pytest.mark.parametrize(
    "bad, words",
    [
        ("10.0.0.5:5000", "tcp://HOST:PORT"),
        ("tcp://host", "tcp://HOST:PORT"),
        ("tcp://host:http", "bad port"),
        ("tcp://host:70000", "out of range"),
        ("tcp://host:0", "real port"),
    ],
)
def test_bad_addresses_are_one_line_errors(bad, words):
    with pytest.raises(ConfigError, match=words) as error:
        address.learner_addresses(bad)
    assert "\n" not in str(error.value)
