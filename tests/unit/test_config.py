"""Config: flags and EPD_* variables, flags winning, impossible or unknown settings named."""

from __future__ import annotations

import pytest

from common.config import ConfigError, EncoderConfig, LanguageConfig
from services.tools.cli import build_config, make_parser


def parse(*argv):
    return make_parser().parse_args(list(argv))


def test_defaults_and_fixed_flag_names():
    args = parse("language", "--encoder", "127.0.0.1:1")
    cfg = build_config(LanguageConfig, args, environ={})
    assert (cfg.block_size, cfg.initial_tokens, cfg.alloc_policy, cfg.tp) == (128, 8192, "fixed", 1)
    assert cfg.record.field("embeddings").spec.dtype == "bfloat16"
    # The fixed flags exist (docs/DESIGN.md, "Names other tools rely on").
    parse(
        "encoder",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
        "--metrics-port",
        "2",
        "--device",
        "cpu",
        "--protocol",
        "tcp",
        "--block-size",
        "64",
        "--pool-blocks",
        "8",
        "--hidden",
        "16",
        "--dtype",
        "bfloat16",
        "--model",
        "bytes",
    )
    parse(
        "language",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
        "--metrics-port",
        "2",
        "--encoder",
        "a:1",
        "--encoder",
        "b:2",
        "--tp",
        "1",
        "--data-ranks",
        "0",
        "--device",
        "cpu",
        "--protocol",
        "tcp",
        "--block-size",
        "64",
        "--pool-blocks",
        "8",
        "--hidden",
        "16",
        "--dtype",
        "bfloat16",
        "--initial-tokens",
        "100",
        "--alloc-policy",
        "adaptive",
        "--consumer",
        "null",
    )
    parse("demo", "--requests", "3", "--tp", "1", "--encoders", "1", "--json")


def test_env_and_flags_win():
    env = {
        "EPD_BLOCK_SIZE": "32",
        "EPD_POOL_BLOCKS": "7",
        "EPD_INTEGRITY": "false",
        "EPD_ENCODER": "h:1,h:2",
    }
    cfg = build_config(LanguageConfig, parse("language", "--pool-blocks", "9"), environ=env)
    assert (cfg.block_size, cfg.pool_blocks, cfg.integrity, cfg.encoder) == (
        32,
        9,
        False,
        ("h:1", "h:2"),
    )


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        (("encoder", "--block-size", "100"), {}, "block_size=100"),
        (("encoder", "--pool-blocks", "0"), {}, "pool_blocks=0"),
        (("encoder", "--device", "gpu"), {}, "device='gpu'"),
        (("encoder", "--bootstrap-timeout-s", "0"), {}, "bootstrap_timeout_s=0"),
        (("encoder",), {"EPD_BLOCK_SIZE": "abc"}, "EPD_BLOCK_SIZE='abc'"),
        (("encoder",), {"EPD_NO_SUCH_SETTING": "1"}, "EPD_NO_SUCH_SETTING"),
        (("language", "--encoder", "nohostport"), {}, "encoder='nohostport'"),
        (("language", "--encoder", "h:1", "--initial-tokens", "0"), {}, "initial_tokens=0"),
        (
            ("language", "--encoder", "h:1", "--tp", "2", "--data-ranks", "0,2"),
            {},
            "data_ranks='0,2'",
        ),
    ],
)
def test_impossible_values_are_named(argv, env, needle):
    cls = EncoderConfig if argv[0] == "encoder" else LanguageConfig
    with pytest.raises(ConfigError, match=None) as e:
        build_config(cls, parse(*argv), environ=env)
    assert needle in str(e.value)


def test_cli_exits_2_on_bad_setting(capsys):
    from services.tools.cli import main

    assert main(["encoder", "--block-size", "3"]) == 2
    assert "block_size=3" in capsys.readouterr().err


# ------------------------------------------------------------------ transport security


@pytest.fixture
def pem_files(tmp_path):
    """A self-signed certificate and its key, another key, a token file, an empty file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key_pem(key):
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = {
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key_pem(key),
        "other_key": key_pem(other),
        "token": b"  abc123\n",
        "empty": b" \n",
        "two_lines": b"a\nb\n",
    }
    for n, data in files.items():
        (tmp_path / n).write_bytes(data)
    return lambda n: str(tmp_path / n)


def test_security_settings_accepted(pem_files):
    cfg = build_config(
        LanguageConfig,
        parse(
            "language",
            "--encoder",
            "h:1",
            "--tls-cert",
            pem_files("cert"),
            "--tls-key",
            pem_files("key"),
            "--tls-ca",
            pem_files("cert"),
            "--tls-server-name",
            "enc.example",
            "--auth-token-file",
            pem_files("token"),
            "--protect-inspection",
            "--max-message-bytes",
            "1048576",
        ),
        environ={},
    )
    assert (cfg.tls_server_name, cfg.protect_inspection, cfg.max_message_bytes) == (
        "enc.example",
        True,
        1 << 20,
    )
    env = {
        "EPD_TLS_CERT": pem_files("cert"),
        "EPD_TLS_KEY": pem_files("key"),
        "EPD_AUTH_TOKEN_FILE": pem_files("token"),
        "EPD_PROTECT_INSPECTION": "1",
    }
    cfg = build_config(EncoderConfig, parse("encoder"), environ=env)
    assert cfg.tls_cert == pem_files("cert") and cfg.protect_inspection
    from services.edge.security import ClientSecurity, ServerSecurity

    assert ServerSecurity.from_config(cfg).token == "abc123"  # stripped
    assert ClientSecurity.from_config(cfg).tls
    assert not ClientSecurity.from_config(EncoderConfig()).tls  # plaintext by default


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--tls-cert", "{cert}"), "give both or neither"),
        (("--tls-key", "{key}"), "give both or neither"),
        (("--tls-ca", "{cert}"), "needs this process's own certificate"),
        (
            ("--tls-cert", "{cert}", "--tls-key", "{other_key}"),
            "not a PEM certificate and its private key",
        ),
        (("--tls-cert", "{token}", "--tls-key", "{key}"), "tls_cert="),
        (
            ("--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-ca", "{token}"),
            "not a PEM CA bundle",
        ),
        (("--tls-cert", "{missing}", "--tls-key", "{key}"), "cannot read it"),
        (("--auth-token-file", "{empty}"), "the file is empty"),
        (("--auth-token-file", "{two_lines}"), "one line"),
        (("--auth-token-file", "{missing}"), "auth_token_file="),
        (("--protect-inspection",), "needs auth_token_file or tls_ca"),
        (("--max-message-bytes", "1000"), "max_message_bytes=1000"),
        (("--tls-server-name", "x"), "only used with TLS"),
    ],
)
def test_impossible_security_settings_are_named(pem_files, flags, needle):
    argv = [
        "language",
        "--encoder",
        "h:1",
        *(
            f.format(
                **{
                    n: pem_files(n)
                    for n in ("cert", "key", "other_key", "token", "empty", "two_lines", "missing")
                }
            )
            for f in flags
        ),
    ]
    with pytest.raises(ConfigError) as e:
        build_config(LanguageConfig, parse(*argv), environ={})
    assert needle in str(e.value)
    assert "abc123" not in str(e.value)  # the secret is never echoed
