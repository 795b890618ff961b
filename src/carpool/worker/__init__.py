"""The worker: turns a scheduling decision into one batch, runs the model, samples."""
