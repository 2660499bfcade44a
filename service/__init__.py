"""QuickBooks Online webhook receiver."""

__version__ = "0.1.0"
