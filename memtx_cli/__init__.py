"""memtx: long-term memory for language models (Memorizing Transformers, Wu et al., ICLR 2022).

Importing this package is cheap: torch, faiss and friends load only when a command needs them.
"""

__version__ = "0.1.0"

from memtx_cli.errors import MemtxError  # noqa: E402

__all__ = ["MemtxError", "__version__"]
