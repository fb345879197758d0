"""DAFormer's training recipe as ddb-jax settings (lhoyer/DAFormer,
configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py).

What it changes from DDB's self-training (configs/default.py): EMA 0.999; batch 2; rare
class sampling (temperature 0.01, 3000 pixels, crop ratio 0.5); the ImageNet feature
distance (0.005, thing classes, cell ratio 0.75) against the frozen ImageNet MiT-B5;
pseudo-label crop (15 top, 120 bottom rows); no weight decay on 'norm' and 'pos_block'
parameters; and DACS's draws: one jitter and one blur coin per batch, the 2-D blur kernel,
class-mix classes chosen among the whole batch's labels. Its schedule (AdamW 6e-5, head
x10, 1500 warm-up iterations, linear decay to 40k), thresholds and jitter are DDB's too.
"""

import ml_collections

from ddb_jax.labels import THING_CLASSES

IMNET = "pretrained/mit_b5"


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with DAFormer's recipe (its model: MiT-B5 + DAFormer head from ImageNet)."""
    config.model.backbone = "mit_b5"
    config.model.head = "daformer"
    config.model.head_channels = 256
    config.init_from = IMNET
    config.batch_size = 2
    config.st.ema_alpha = 0.999
    config.st.pseudo_weight_ignore_top = 15
    config.st.pseudo_weight_ignore_bottom = 120
    config.st.coins_per_batch = True
    config.st.blur_2d = True
    config.st.classes_from_batch = True
    config.data.rare_class_sampling = True
    config.data.rcs_temperature = 0.01
    config.data.rcs_min_pixels = 3000
    config.data.rcs_min_crop_ratio = 0.5
    config.fdist.enabled = True
    config.fdist.weight = 0.005
    config.fdist.classes = THING_CLASSES
    config.fdist.min_ratio = 0.75
    config.fdist.imnet_from = IMNET
    config.optim.no_decay_keys = ("norm", "pos_block")
    return config
