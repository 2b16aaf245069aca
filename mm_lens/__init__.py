"""mm-lens: cross-modal information flow in LLaVA-family models, on TransformerLens."""

from mm_lens.errors import MMLensError

__all__ = ["MMLensError"]
__version__ = "0.1.0"
