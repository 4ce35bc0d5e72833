"""Flax Linen modules: parameters and forward passes only (no training code, no devices)."""
