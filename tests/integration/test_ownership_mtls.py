"""Ownership bound to mutual-TLS identities: with real certificates from one CA, a
caller presenting another certificate cannot use a language instance's id — not to Register over
its session, not to Init, Resume, Status or Cancel its transfers — even when it sends that
instance's language_id; the owner, with its own certificate, goes on undisturbed. Each refusal:
PERMISSION_DENIED, no byte of the owner's pool changed, the transfer and the encoder's pool as
before. Certificates come from tests/integration/test_security.py's `Certs` (the `cryptography`
package); the encoder is a real process, the ranks are `TestRank`s in this process.
"""

from __future__ import annotations

import pytest
import torch

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc
from tests.conftest import ServiceProcess
from tests.integration.rank_harness import TestRank
from tests.integration.test_ownership import (
    BLOCK,
    HIDDEN,
    PD,
    RANK_BLOCKS,
    drain,
    expect,
    finish_victim,
    hold_victim,
    memory,
    pool_used,
    rid,
    state_of,
)
from tests.integration.test_security import Certs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def encoder(certs):
    p = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "256",
        "--resume-timeout-s",
        "60",
        *certs.service_args("encoder", token=None),
    )
    yield p
    p.stop()


async def test_another_certificate_cannot_use_the_owners_language_id(encoder, certs):
    owner = TestRank(
        hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS, language_id=rid("lang-a")
    )
    # The intruder's own rank: same language_id as the owner (it read it from inspection, say).
    intruder = TestRank(
        hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS, language_id=owner.language_id
    )
    try:
        async with (
            certs.client("language-a", token=None).aio_channel(encoder.address) as own_ch,
            certs.client("client", token=None).aio_channel(encoder.address) as other_ch,
        ):
            enc, evil = encoder_pb2_grpc.EncoderStub(own_ch), encoder_pb2_grpc.EncoderStub(other_ch)
            await owner.register(enc)
            request_id = rid()
            blocks, statuses = await hold_victim(enc, owner, request_id)
            intruder.pool.slab.fill_(0x5A)
            before = (
                await state_of(enc, request_id),
                await pool_used(enc),
                memory(owner),
                memory(intruder),
            )

            async def unchanged(what: str) -> None:
                assert (await state_of(enc, request_id), await pool_used(enc)) == before[:2], what
                assert torch.equal(memory(owner), before[2]), (
                    f"{what} changed bytes of the owner's pool"
                )
                assert torch.equal(memory(intruder), before[3]), (
                    f"{what} changed bytes of the intruder's pool"
                )

            # Register over the owner's session key, and any registration on its Mooncake session.
            await expect(intruder.register_claiming(evil), PD, "registered by another identity")
            # The owner's pool under a language_id of its own: the proof fails (the nonce is in
            # the intruder's pool, not the owner's).
            await expect(
                intruder.register_claiming(evil, language_id=rid("other"), layout=owner.layout()),
                PD,
                "does not hold this registration's nonce",
            )
            await unchanged("Register by another certificate")
            mine = intruder.alloc(2, clear=False)
            await expect(
                evil.Init(intruder.init_request(rid(), mine)), PD, "registered by another identity"
            )
            await expect(evil.Init(intruder.init_request(request_id, mine)), PD)
            await expect(
                evil.Resume(intruder.resume_request(request_id, 2 * BLOCK, mine)), PD, request_id
            )
            await expect(drain(evil.Status(intruder.status_request(request_id))), PD, request_id)
            await expect(
                evil.Cancel(intruder.cancel_request(request_id, "integrity: forged")),
                PD,
                request_id,
            )
            await expect(evil.Encode(intruder.encode_request(request_id, 500, 1)), PD, request_id)
            await unchanged("Init/Resume/Status/Cancel/Encode by another certificate")
            intruder.free(mine)
            # An Encode without a language_id binds the certificate it came with: another
            # certificate cannot claim it by Init (no pre-seeded payload under someone's id).
            seeded = rid("seeded")
            anonymous = intruder.encode_request(seeded, 40, 9)
            anonymous.language_id = ""
            await evil.Encode(anonymous)
            theirs = owner.alloc(1, clear=False)
            await expect(enc.Init(owner.init_request(seeded, theirs)), PD, seeded)
            assert torch.equal(memory(owner), before[2]), (
                "a pre-seeded payload reached the owner's pool"
            )
            owner.free(theirs)
            await evil.Cancel(
                intruder.cancel_request(seeded, language_id="")
            )  # its own certificate may
            # The owner's certificate may re-register (idempotent) and finishes its transfer.
            await owner.register(enc)
            await finish_victim(enc, owner, request_id, blocks, statuses)
            assert torch.equal(memory(intruder), before[3])
        await assert_all_free_tls(encoder, certs)
    finally:
        owner.release_all()
        intruder.release_all()
        owner.close()
        intruder.close()


async def assert_all_free_tls(encoder, certs) -> None:
    """The encoder's pool free and no live transfer (inspection over the mTLS channel)."""
    async with certs.client("client", token=None).aio_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        pool = await stub.GetPool(common_pb2.GetPoolRequest())
        assert pool.used_blocks == 0 and pool.waiters == 0
        live = await stub.ListTransfers(common_pb2.ListTransfersRequest(states=[1, 2, 3]))
        assert not live.transfers
