"""The real torch engine: a Llama-style decoder over a paged KV cache, behind `TorchRunner`."""

from engines.torch.runner import TorchRunner

__all__ = ["TorchRunner"]
