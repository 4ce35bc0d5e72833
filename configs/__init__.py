"""Experiment configs: one experiment per file, ``get_config(arg) -> ConfigDict``."""
