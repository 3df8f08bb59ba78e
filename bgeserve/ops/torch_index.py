"""Where PyTorch publishes its wheels: one index per build tag (cpu, cu126, cu128, ...)."""

PYTORCH_INDEX = "https://download.pytorch.org/whl"
