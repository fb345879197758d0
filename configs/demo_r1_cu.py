"""Toy domains, round 1, cut path: a small ResNet that trains in minutes on a laptop CPU.

Generate the data first: ``python -m input_pipeline.toy --out data/toy``.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.stage = "self_training"
    config.model.backbone = "resnet18_v1c"
    config.model.head_channels = 64
    config.model.conv_impl = "im2col"  # ~2x faster training on CPU
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (128, 128)
    config.batch_size = 4
    config.mesh_devices = 1
    config.num_steps = 300
    config.optim.lr = 3e-4
    config.optim.warmup_iters = 30
    config.st.mask = "cut"
    config.log_every = 25
    config.eval_every = 150
    config.checkpoint_every = 150
    config.image_summary_every = 100_000
    return config
