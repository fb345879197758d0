"""Evaluate a model directory on Mapillary Vistas val (19 Cityscapes classes, half size)."""

from configs import default


def get_config():
    config = default.get_config()
    config.stage = "evaluate"
    config.data.target = ("mapillary",)
    config.eval.mode = "whole"
    return config
