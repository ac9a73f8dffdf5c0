"""The encoder's `write_timeout_s` (issue 8): the bound on one Mooncake write into a dead link.
Checked against the real config and a real Mooncake engine (the settings are environment
variables Mooncake reads when the engine is built; tests/integration/test_netns.py shows the
effect on a cut link)."""

from __future__ import annotations

import os

import pytest

from common.config import ConfigError, EncoderConfig
from common.transport import MooncakeTransport

MOONCAKE_VARS = ("MC_TRANSFER_TIMEOUT", "MC_TCP_PROGRESS_TIMEOUT_SEC")


@pytest.mark.parametrize("bad", [4.9, 0, -1, 3601])
def test_out_of_range_write_timeout_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=rf"write_timeout_s={bad}: must be in 5\.\.3600"):
        EncoderConfig(write_timeout_s=bad).validate()


def test_default_is_mooncakes_own():
    cfg = EncoderConfig()
    cfg.validate()
    assert cfg.write_timeout_s == 30.0


@pytest.fixture
def clean_mooncake_env():
    saved = {k: os.environ.get(k) for k in MOONCAKE_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("seconds, transfer, progress", [(7.5, "8", "3"), (5, "5", "2"), (30, "30", "15")])
def test_transport_sets_mooncakes_timeouts_connection_first(clean_mooncake_env, seconds, transfer, progress):
    """The sync write gives up after MC_TRANSFER_TIMEOUT; the TCP connection, which could still
    read our blocks, is dropped earlier (MC_TCP_PROGRESS_TIMEOUT_SEC without progress)."""
    t = MooncakeTransport("127.0.0.1", "tcp", write_timeout_s=seconds)
    try:
        assert (os.environ["MC_TRANSFER_TIMEOUT"], os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"]) == (transfer, progress)
        assert int(os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"]) < int(os.environ["MC_TRANSFER_TIMEOUT"])
    finally:
        t.close()


def test_transport_without_a_write_timeout_leaves_mooncakes_settings_alone(clean_mooncake_env):
    for k in MOONCAKE_VARS:
        os.environ.pop(k, None)
    t = MooncakeTransport("127.0.0.1", "tcp")
    t.close()
    assert not any(k in os.environ for k in MOONCAKE_VARS)


def test_an_unknown_write_wait_is_refused_by_name():
    with pytest.raises(ConfigError, match="write_wait='busy'"):
        EncoderConfig(write_wait="busy").validate()
    EncoderConfig(write_wait="spin").validate()
