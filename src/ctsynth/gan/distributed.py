"""torchrun support: one process per device, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_from_environment(device: str = "auto") -> tuple[str, int]:
    """Join the process group torchrun describes in the environment; returns (device, world size)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d on %s (%s)", dist.get_rank(), world_size, device, backend)
    return device, world_size
