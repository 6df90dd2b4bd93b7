"""gptforge: train, finetune, sample and serve GPT-2 style models."""

from gptforge.model import GPT, GPTConfig

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "__version__"]
