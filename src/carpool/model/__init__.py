"""LLaMA-family decoders: layers, paged attention, the model, its registry and loaders."""
