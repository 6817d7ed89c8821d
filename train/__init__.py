"""Training: dataset and splits, augmentation, the ResNet + head, the loop, plots.
Imported as ``pneumo_edge.train`` (mapped in pyproject.toml); needs torch and torchvision."""
