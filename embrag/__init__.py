"""embrag: retrieval-augmented transformer for genotype imputation (the science; no I/O, no orchestration)."""

__version__ = "0.1.0"
