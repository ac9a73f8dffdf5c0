"""The tests' oracle for the Qwen models: the library's own end-to-end forward on input_ids +
pixel_values (it runs the vision tower, scatters its rows, computes the M-RoPE positions and, for
Qwen3-VL, computes and injects the deepstack features itself), with none of our payload code in
between. Shared by the in-process and the end-to-end tests of every family."""

from __future__ import annotations

import torch

from services.encoder.models import EncodeInputs
from services.tools import demo


def library_forward(full, enc, inp: EncodeInputs) -> tuple[torch.Tensor, int]:
    """(last-position logits in float32, M-RoPE position delta) of the whole model `full`
    (`QwenVL`) on the request `inp`, whose token ids and decoded images `enc` (the encoder model
    of the same weights) prepares: the prompt the model would see, nothing of the payload."""
    enc.prepare(inp)
    plan = enc.plan(inp)
    ids = plan.token_ids[None]
    mm = (ids == enc.image_token).int()
    grid = None
    kwargs = {}
    if plan.images:
        batch = full.processor(images=plan.decoded, return_tensors="pt")
        grid = batch["image_grid_thw"]
        kwargs = dict(pixel_values=batch["pixel_values"], image_grid_thw=grid)
    with torch.inference_mode():
        out = full.model(input_ids=ids, mm_token_type_ids=mm, logits_to_keep=1, **kwargs)
        _, delta = full.model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
    return out.logits[0, -1].float(), int(delta.reshape(-1)[0])


def generated_images(specs) -> list[tuple[bytes, str]]:
    """(bytes, mime type) of the demo's seeded pictures for (width, height, "png"|"jpeg") specs."""
    return [
        (demo.make_image(w, h, fmt, seed=k), f"image/{fmt}") for k, (w, h, fmt) in enumerate(specs)
    ]
