"""PriorReg: deep-learning image registration with learned priors, for 3D Slicer and the command line."""

from .volume import Volume, VolumeError

__all__ = ["Volume", "VolumeError"]
__version__ = "0.1.0"
