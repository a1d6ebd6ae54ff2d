"""Models: name → timm or the small CNN, and what a fine-tuning run trains."""
