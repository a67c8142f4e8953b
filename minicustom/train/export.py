"""The result of a run: a PEFT adapter folder, or (full fine-tuning) a whole checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from ..checkpoint import save_model
from ..methods import adapter_configs, save_adapter
from .loop import rank_and_world


def export(model: nn.Module, out: str | Path, base_model_name_or_path: str | None = None):
    """The result of a run: a PEFT-style adapter folder, or (full fine-tuning) a checkpoint folder.
    Under FSDP2 every process must call it (the full weights are gathered); process 0 writes."""
    rank, _ = rank_and_world()
    if adapter_configs(model):
        if rank == 0:
            save_adapter(model, out, base_model_name_or_path=base_model_name_or_path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=dist.is_initialized()))
    if rank == 0:
        save_model(model, out, state=state)
