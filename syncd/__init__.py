"""syncd: keeps a clinic's data processors consistent with its Phorest records."""

__version__ = "0.1.0"
