"""Stages that compute a method's artifacts from a trained model (DDB's prototypes)."""
