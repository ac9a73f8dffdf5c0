"""Device memory handed to someone outside torch's stream order.

torch queues CUDA work and returns at once. The transfer engine (a TCP worker's memcpy, or a
NIC's DMA under RDMA) and a freed block's next writer do not wait for that queue. So wherever
host code is done with device memory that such a party touches next, it waits for the device
first: the encoder before its payload can be written out, a language rank before a round's
blocks are freed for the next write. On host memory this does nothing.

The waits run in the worker threads that queued the work, never on the event loop.
"""

from __future__ import annotations

import torch


def settle(*tensors: torch.Tensor) -> None:
    """Wait until every kernel and copy queued on the devices of `tensors` has finished (all
    streams: the work may have been queued from other threads); nothing for host tensors."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.synchronize(device)
