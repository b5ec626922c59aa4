"""difflr: fastai's fine-tuning workflow on PyTorch Lightning.

Layer groups, discriminative learning rates, freezing and gradual unfreezing, the one-cycle
policy and the LR range test, as a ``Learner`` facade and as drop-in Lightning callbacks.
"""

from difflr.blocks import BlockSplitter
from difflr.callbacks import ParamScheduler, Recorder
from difflr.groups import LayerGroup
from difflr.interpretation import ClassificationInterpretation, Interpretation
from difflr.learner import Learner
from difflr.lr import LayerDecay, LRSpec, expand_lrs, layer_decay
from difflr.metrics import accuracy, error_rate
from difflr.splitters import split_model
from difflr.stages import GradualUnfreezing, Stage
from difflr.suggestions import SuggestedLRs, minimum, slide, steep, valley
from difflr.vision import vision_learner

__version__ = "0.1.0"

__all__ = [
    "BlockSplitter",
    "ClassificationInterpretation",
    "GradualUnfreezing",
    "Interpretation",
    "LRSpec",
    "LayerDecay",
    "LayerGroup",
    "Learner",
    "ParamScheduler",
    "Recorder",
    "Stage",
    "SuggestedLRs",
    "__version__",
    "accuracy",
    "error_rate",
    "expand_lrs",
    "layer_decay",
    "minimum",
    "slide",
    "split_model",
    "steep",
    "valley",
    "vision_learner",
]
