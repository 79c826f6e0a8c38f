"""editinfinity: text-guided image editing that keeps the background (EditInfinity on Infinity)."""

__version__ = "0.1.0"
