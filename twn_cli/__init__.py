"""twn: train, serve and evaluate Think-When-Needed multimodal embedding models."""

__version__ = "0.1.0"
