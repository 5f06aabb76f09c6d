"""msrnn: transformers as multi-state RNNs (Oren et al., 2024), with TOVA and other policies."""

from importlib.metadata import PackageNotFoundError, version

from . import policies, positions
from .config import Config
from .checkpoint.loading import download, load
from .model import Transformer
from .generate import generate
from .state import MultiState
from .checkpoint.tokenizer import load_tokenizer

try:
    __version__ = version("msrnn")        # pyproject.toml's, as installed: its one source
except PackageNotFoundError:              # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Config", "MultiState", "Transformer", "download", "generate", "load", "load_tokenizer",
           "policies", "positions"]
