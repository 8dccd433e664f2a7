"""Sequence cores: GRU, a pure-PyTorch Mamba weight-compatible with mamba_ssm, bidirectional wrapper."""
from diffcraft.nn.cores import CORES, make_core
from diffcraft.nn.mamba import Mamba

__all__ = ["CORES", "Mamba", "make_core"]
