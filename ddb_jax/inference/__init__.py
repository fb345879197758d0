"""Predictions on any images and their label files."""
