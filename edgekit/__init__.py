"""edgekit: take a trained PyTorch model to phones, NPUs and edge boxes, and keep it good there."""

__version__ = "0.1.0"
