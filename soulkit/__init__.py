"""soulkit: cheap, correct second-order information for PyTorch."""

__version__ = "0.1.0"
