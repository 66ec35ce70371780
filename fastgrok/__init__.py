"""fastgrok: train populations of small grokking transformers at once."""

__version__ = "0.1.0"
