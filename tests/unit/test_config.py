"""Config: flags and EPD_* variables, flags winning, impossible or unknown settings named."""

from __future__ import annotations

import pytest

from common.config import ConfigError, EncoderConfig, LanguageConfig
from services.cli import build_config, make_parser


def parse(*argv):
    return make_parser().parse_args(list(argv))


def test_defaults_and_fixed_flag_names():
    args = parse("language", "--encoder", "127.0.0.1:1")
    cfg = build_config(LanguageConfig, args, environ={})
    assert (cfg.block_size, cfg.initial_tokens, cfg.alloc_policy, cfg.tp) == (128, 8192, "fixed", 1)
    assert cfg.record.field("embeddings").spec.dtype == "bfloat16"
    # DESIGN §14 flags exist.
    parse("encoder", "--host", "127.0.0.1", "--port", "1", "--metrics-port", "2", "--device", "cpu", "--protocol", "tcp",
          "--block-size", "64", "--pool-blocks", "8", "--hidden", "16", "--dtype", "bfloat16", "--model", "bytes")
    parse("language", "--host", "127.0.0.1", "--port", "1", "--metrics-port", "2", "--encoder", "a:1", "--encoder", "b:2",
          "--tp", "1", "--data-ranks", "0", "--device", "cpu", "--protocol", "tcp", "--block-size", "64",
          "--pool-blocks", "8", "--hidden", "16", "--dtype", "bfloat16", "--initial-tokens", "100",
          "--alloc-policy", "adaptive", "--consumer", "null")
    parse("demo", "--requests", "3", "--tp", "1", "--encoders", "1", "--json")


def test_env_and_flags_win():
    env = {"EPD_BLOCK_SIZE": "32", "EPD_POOL_BLOCKS": "7", "EPD_INTEGRITY": "false", "EPD_ENCODER": "h:1,h:2"}
    cfg = build_config(LanguageConfig, parse("language", "--pool-blocks", "9"), environ=env)
    assert (cfg.block_size, cfg.pool_blocks, cfg.integrity, cfg.encoder) == (32, 9, False, ("h:1", "h:2"))


@pytest.mark.parametrize("argv, env, needle", [
    (("encoder", "--block-size", "100"), {}, "block_size=100"),
    (("encoder", "--pool-blocks", "0"), {}, "pool_blocks=0"),
    (("encoder", "--device", "gpu"), {}, "device='gpu'"),
    (("encoder", "--bootstrap-timeout-s", "0"), {}, "bootstrap_timeout_s=0"),
    (("encoder",), {"EPD_BLOCK_SIZE": "abc"}, "EPD_BLOCK_SIZE='abc'"),
    (("encoder",), {"EPD_NO_SUCH_SETTING": "1"}, "EPD_NO_SUCH_SETTING"),
    (("language", "--encoder", "nohostport"), {}, "encoder='nohostport'"),
    (("language", "--encoder", "h:1", "--initial-tokens", "0"), {}, "initial_tokens=0"),
    (("language", "--encoder", "h:1", "--tp", "2", "--data-ranks", "0,2"), {}, "data_ranks='0,2'"),
])
def test_impossible_values_are_named(argv, env, needle):
    cls = EncoderConfig if argv[0] == "encoder" else LanguageConfig
    with pytest.raises(ConfigError, match=None) as e:
        build_config(cls, parse(*argv), environ=env)
    assert needle in str(e.value)


def test_cli_exits_2_on_bad_setting(capsys):
    from services.cli import main

    assert main(["encoder", "--block-size", "3"]) == 2
    assert "block_size=3" in capsys.readouterr().err
