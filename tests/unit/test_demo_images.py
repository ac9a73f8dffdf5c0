"""`epd demo`'s image requests: the plan, the generated images, the checks and the report (pure)."""

from __future__ import annotations

import io

from PIL import Image

from services.tools import demo


def test_image_plan_spans_sizes_and_rounds():
    plan = demo.plan_images(7, seed=3, first_index=24)
    assert [p.name for p in plan] == [name for name, _, _ in demo.IMAGE_SET]
    assert len({p.request_id for p in plan}) == 7 and all(p.kind == "image" for p in plan)
    assert [p.index for p in plan] == list(range(24, 31))
    by_name = {p.name: p for p in plan}
    assert 20 <= by_name["thumbnail"].tokens < 100  # a few dozen
    assert by_name["album"].tokens > 20_000  # many thousands
    assert (
        by_name["gallery"].min_rounds == by_name["comic"].min_rounds == 2
        and by_name["album"].min_rounds >= 3
    )
    assert sum(p.min_rounds > 1 for p in plan[:6]) >= 2  # the default 6: several need resume rounds
    assert {f for p in plan for _, _, f in p.images} == {"png", "jpeg"}
    # The count: text bytes (placeholders removed) + per image (H/28)(W/28) + vision start/end.
    three = by_name["three"]
    assert three.tokens == len(three.text.replace("<image>", "").encode()) + sum(
        demo.qwen_image_tokens(w, h) + 2 for w, h, _ in three.images
    )
    assert demo.plan_images(9)[7].name == "thumbnail"  # cycles


def test_qwen_image_tokens_rule():
    assert demo.qwen_image_tokens(224, 160) == 8 * 6
    assert demo.qwen_image_tokens(1280, 720) == 46 * 26
    assert demo.qwen_image_tokens(28, 28) == 4  # scaled up to min_pixels (56x56)
    assert demo.qwen_image_tokens(8000, 8000) <= 16384  # scaled down to max_pixels


def test_make_image_sizes_and_formats():
    for w, h, fmt, kind in ((300, 120, "png", "PNG"), (97, 333, "jpeg", "JPEG")):
        data = demo.make_image(w, h, fmt, seed=1)
        img = Image.open(io.BytesIO(data))
        assert img.size == (w, h) and img.format == kind
    assert demo.make_image(64, 64, "png", 1) != demo.make_image(64, 64, "png", 2)


def _result(**kw) -> demo.RequestResult:
    p = demo.plan_images(1)[0]
    r = demo.RequestResult(
        request=p,
        rpc_ok=True,
        total_tokens=p.tokens,
        rounds=1,
        integrity_verified=True,
        first_token_id=42,
        consumer="qwen2-vl-prefill",
        top_token_ids=[42, 7],
        top_logits=[3.5, 2.0],
        rank_sha256=[(0, "ab"), (1, "ab")],
        latency_s=0.5,
        prefill_seconds=0.01,
    )
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_check_image_reply():
    assert demo.check_image_reply(_result()) == []
    assert "predicted" in demo.check_image_reply(_result(total_tokens=1))[0]
    assert (
        "no first token"
        in demo.check_image_reply(_result(first_token_id=-1, prefill_skipped="why"))[0]
    )
    assert (
        "different payloads"
        in demo.check_image_reply(_result(rank_sha256=[(0, "ab"), (1, "cd")]))[0]
    )
    assert demo.check_image_reply(_result(first_token_id=-1), expect_first_token=False) == []


def test_summary_and_table_report_first_tokens():
    synthetic = demo.RequestResult(
        request=demo.plan_workload(1)[0],
        rpc_ok=True,
        total_tokens=10,
        rounds=1,
        integrity_verified=True,
        latency_s=0.1,
    )
    image = _result()
    image.problems = []
    s = demo.summarize([image, synthetic], wall_seconds=1.0, config={"model": "tiny", "tp": 1})
    assert s["requests"] == 2 and s["synthetic_requests"] == 1
    assert [r["first_token_id"] for r in s["per_request"]] == [42, -1]
    assert s["image_requests"][0]["first_token_id"] == 42 and s["image_requests"][0]["images"] == [
        "224x160 png"
    ]
    assert s["kinds"]["image"]["requests"] == 1
    table = demo.format_table(s)
    assert "first token" in table and "thumbnail" in table and "42" in table
