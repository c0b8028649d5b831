"""fedzip: federated fine-tuning of language models with every byte counted."""

__version__ = "0.1.0"
