"""svertka's training and export stage (needs the ``train`` extra: torch, torchvision)."""
