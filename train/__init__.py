"""Command-line entry points: ``python -m train``, ``train.sample``, ``train.eval``."""
