"""Training: the loop every objective shares, and the objectives.

    loop.py    TrainConfig, the lr schedule, data order, gradient accumulation, setup/step/log-and-save
    task.py    the Task protocol an objective implements
    sft.py     supervised fine-tuning (train)
    dpo.py     DPO and its family (train_dpo)
    kto.py     KTO from unpaired feedback (train_kto)
    rm.py      reward models (train_rm)
    rollout.py rl.py ppo.py   online RL: rollouts; GRPO and RLOO (train_rl); PPO (train_ppo)
    state.py   checkpoints, resume records, Ctrl-C
    export.py  the run's result: an adapter folder, or a checkpoint folder
"""

from ..methods import apply_method  # where the README imported it before the registry held it
from .dpo import DPOConfig, train_dpo
from .export import export
from .kto import KTOConfig, train_kto
from .loop import TrainConfig, run
from .ppo import PPOConfig, train_ppo
from .rl import RLConfig, train_rl
from .rm import RMConfig, train_rm
from .sft import train
from .state import Interrupted, TrainingError
from .task import Task

__all__ = ["apply_method", "DPOConfig", "train_dpo", "KTOConfig", "train_kto", "RMConfig", "train_rm", "RLConfig",
           "train_rl", "PPOConfig", "train_ppo", "export", "TrainConfig", "run", "train", "Interrupted",
           "TrainingError", "Task"]
