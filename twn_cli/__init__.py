"""twn: train, serve and evaluate Think-When-Needed multimodal embedding models."""

__version__ = "0.2.0"
