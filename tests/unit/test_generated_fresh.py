"""The committed stubs in common/pb/ are exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = {
        p.relative_to(ROOT / "common" / "pb"): p.read_text()
        for p in (ROOT / "common" / "pb").rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    fresh = {
        p.relative_to(tmp_path): p.read_text()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(committed) == sorted(fresh), "stub files differ: run `make proto`"
    stale = [str(name) for name in fresh if committed[name] != fresh[name]]
    assert not stale, (
        f"stale generated stubs {stale}: run `make proto` (python scripts/gen_proto.py) and commit"
    )


def test_proto_has_the_fixed_names():
    """Names that outside tools rely on (docs/DESIGN.md, "Names other tools rely on")."""
    from common.pb.epd.v1 import common_pb2, encoder_pb2, language_pb2

    assert [v.name for v in common_pb2.TransferState.DESCRIPTOR.values] == [
        "TRANSFER_STATE_UNSPECIFIED",
        "TRANSFER_STATE_BOOTSTRAPPING",
        "TRANSFER_STATE_WAITING_FOR_INPUT",
        "TRANSFER_STATE_TRANSFERRING",
        "TRANSFER_STATE_SUCCESS",
        "TRANSFER_STATE_FAILED",
    ]
    assert [v.name for v in common_pb2.FailureReason.DESCRIPTOR.values] == [
        "FAILURE_REASON_UNSPECIFIED",
        "FAILURE_REASON_TIMEOUT",
        "FAILURE_REASON_CANCELLED",
        "FAILURE_REASON_TRANSPORT",
        "FAILURE_REASON_INTEGRITY",
        "FAILURE_REASON_RESOURCE_EXHAUSTED",
        "FAILURE_REASON_PEER_LOST",
        "FAILURE_REASON_INVALID",
    ]
    enc = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
    assert {
        "Encode",
        "Register",
        "Init",
        "Resume",
        "Status",
        "GetTransfer",
        "ListTransfers",
        "Cancel",
    } <= set(enc.methods_by_name)
    assert enc.methods_by_name["Status"].server_streaming
    lang = language_pb2.DESCRIPTOR.services_by_name["Language"]
    assert {"Generate", "GetTransfer", "ListTransfers", "Cancel"} <= set(lang.methods_by_name)
    fields = {f.name: f.number for f in common_pb2.TransferStatus.DESCRIPTOR.fields}
    assert fields == {
        **fields,
        "request_id": 1,
        "state": 2,
        "sent_tokens": 3,
        "total_tokens": 4,
        "round": 5,
        "round_tokens": 6,
        "allocated_tokens": 7,
        "checksums": 8,
        "error": 9,
    }
    gen = {f.name: f.number for f in language_pb2.GenerateReply.DESCRIPTOR.fields}
    assert gen == {
        **gen,
        "request_id": 1,
        "total_tokens": 2,
        "rounds": 3,
        "bytes": 4,
        "transfer_seconds": 5,
        "total_seconds": 6,
        "integrity_verified": 7,
        "encoder": 8,
        "payload_sha256": 9,
        "first_token_id": 10,
    }
