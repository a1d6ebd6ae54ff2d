"""Datasets, their feature maps and the feature cache."""
