"""Inference over a labelled set and its scores; stage 'evaluate'."""
