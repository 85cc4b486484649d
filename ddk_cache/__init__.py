"""ddk-cache: cache a teacher's top-k log-probabilities once, distill many students from it."""

__version__ = "0.1.0"
