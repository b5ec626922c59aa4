"""difflr: fastai's fine-tuning workflow on PyTorch Lightning.

Layer groups, discriminative learning rates, freezing and gradual unfreezing, the one-cycle
policy and the LR range test, as a ``Learner`` facade and as drop-in Lightning callbacks.
"""

import warnings

with warnings.catch_warnings():
    # Lightning imports torchmetrics, which imports transformers, which imports tqdm.auto: in a
    # Jupyter kernel without ipywidgets that warns "IProgress not found" once, at import. difflr
    # draws its own progress (no tqdm widgets), so the warning says nothing about difflr.
    warnings.filterwarnings("ignore", message="IProgress not found")
    from difflr.callbacks.recorder import Recorder
    from difflr.callbacks.scheduler import ParamScheduler
    from difflr.callbacks.unfreezing import GradualUnfreezing
    from difflr.groups.blocks import BlockSplitter
    from difflr.groups.layers import LayerGroup
    from difflr.groups.splitters import split_model
    from difflr.interpretation import ClassificationInterpretation, Interpretation
    from difflr.learner import Learner
    from difflr.metrics import accuracy, error_rate
    from difflr.policy.lr import LayerDecay, LRSpec, expand_lrs, layer_decay
    from difflr.policy.stages import Stage
    from difflr.policy.suggestions import SuggestedLRs, minimum, slide, steep, valley
    from difflr.training.lr_finder_callback import LRFinder
    from difflr.vision import vision_learner

__version__ = "0.1.0"

__all__ = [
    "BlockSplitter",
    "ClassificationInterpretation",
    "GradualUnfreezing",
    "Interpretation",
    "LRFinder",
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
