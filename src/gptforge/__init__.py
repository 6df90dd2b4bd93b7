"""gptforge: train, finetune, sample and serve GPT-2 style models.

`GPT` and `GPTConfig` load on first use (PEP 562), so a module that needs no torch, such as the data
preparation's worker processes, imports the package without it."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "__version__"]

if TYPE_CHECKING:
    from gptforge.model import GPT, GPTConfig


def __getattr__(name: str) -> Any:
    if name in ("GPT", "GPTConfig"):
        from gptforge import model

        return getattr(model, name)
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
