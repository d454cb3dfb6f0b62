"""ktenv: per-arch locked environments for sglang-kt + KT-Kernel."""

__version__ = "0.1.0"
