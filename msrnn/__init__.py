"""msrnn: transformers as multi-state RNNs (Oren et al., 2024), with TOVA and other policies."""

from . import policies
from .config import Config
from .loading import download, load
from .model import Transformer
from .generate import generate
from .state import MultiState
from .tokenizer import load_tokenizer

__all__ = ["Config", "MultiState", "Transformer", "download", "generate", "load", "load_tokenizer",
           "policies"]
