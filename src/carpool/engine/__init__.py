"""The engine: requests in, one scheduled forward pass per step, outputs out."""
