"""A lean PyTorch training engine for diffusion, flow and latent style-transport models."""
