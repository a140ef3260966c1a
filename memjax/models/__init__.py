"""Flax NNX ports of open architectures; importing this registers their converters.

Architectures: BERT, CLIP, ViT, ResNet (Hugging Face), GPT-2, GPT-NeoX (Pythia), and the
native CIFAR ResNet-9/ResNet-18. Every model reports named activations through
:class:`Taps` (see :mod:`memjax.models.taps`).
"""

from memjax.models import bert, cifar_resnet, clip, gpt2, gpt_neox, resnet, vit
from memjax.models.taps import Taps, tap, with_taps

__all__ = ["Taps", "bert", "cifar_resnet", "clip", "gpt2", "gpt_neox", "resnet", "tap",
           "vit", "with_taps"]
