"""zsdistill: distil a zero-shot NLI (or embedding) classifier into a fast standard student."""

__version__ = "0.1.0"
