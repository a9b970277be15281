"""The training application: configs and recipes, the loop, checkpoints, run folders, distributed
training (torchrun + DistributedDataParallel) and the datasets.

Example:
    >>> from deepshift.training import TrainConfig
    >>> TrainConfig(data="digits", method="ps", weight_bits=3).resolved().optimizer
    'radam'
"""

from deepshift.training.config import TrainConfig
from deepshift.training.evaluate import evaluate, evaluate_checkpoint
from deepshift.training.loop import resume, train

__all__ = ["TrainConfig", "evaluate", "evaluate_checkpoint", "resume", "train"]
