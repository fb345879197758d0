"""The domain-adaptation ops of every method: pure, jittable functions of arrays (bridging,
augmentation, losses, prototypes, ensembles, adversarial losses)."""
