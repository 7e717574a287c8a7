"""Where a stage's tensors run: one rule for every stage.

    auto      CUDA (the current default card) when torch sees one, else the CPU
    cpu       the CPU, even on a GPU machine (e.g. to reproduce CPU numbers exactly)
    cuda[:N]  that card; an error naming the setting when torch sees no CUDA device

Each stage reads its own `device` key from params.yaml (a setting per stage, so one stage can be
moved to the CPU while the others use the card), resolves it here, and records both the setting
and the device it got in its MLflow run (`record_device`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
# The type of every `device` key in config.py: checked when params.yaml is read, not mid-stage.
DeviceSetting = Annotated[str, Field(pattern=DEVICE_PATTERN)]


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device for a params `device` setting (see the module docstring)."""
    import torch

    if not re.match(DEVICE_PATTERN, setting):
        raise ValueError(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {setting!r} asked for, but torch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device: auto or cpu")
        index = int(setting.split(":")[1]) if ":" in setting else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {setting!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and generation, for every speed figure and cache key that names the
    machine: e.g. ``AMD EPYC (family 26, model 2)``. Cloud VMs often report a bare "AMD EPYC" for
    CPU generations that differ twofold in vector width (Zen 4 is family 25, Zen 5 family 26)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    if "model name" in fields:
        generation = ", ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model") if k in fields)
        return fields["model name"] + (f" ({generation})" if generation else "")
    import platform

    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The card's or the CPU's name, for the record."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def record_device(setting: str, device: torch.device) -> dict[str, str]:
    """Tag the active MLflow run (if any) with the setting, the device it resolved to and its name."""
    import mlflow

    tags = {"device_setting": setting, "device": str(device), "device_name": device_description(device)}
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)
    log.info("device %s (%s; setting %s)", tags["device"], tags["device_name"], setting)
    return tags
