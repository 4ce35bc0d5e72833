"""PyTorch-format weight I/O: safetensors, key tables, tolerant config reading."""
from jaxgen.convert.pretrained import CLASSES, Pretrained, load_pretrained, save_pretrained

__all__ = ["CLASSES", "Pretrained", "load_pretrained", "save_pretrained"]
