"""Synthetic data and its renderer, kept apart: training, caching and prediction never import it."""
