"""Shared defaults for every DDB stage (the reference's numbers, docs/method.md §1.1).

Stage configs import this, override what differs, and return the result. Every
key a stage may set exists here, so a misspelt override
(``--config.batchsize=2``) fails with the key's name.
"""

import ml_collections

from ddb_jax import methods
from ddb_jax.labels import THING_CLASSES


def get_model_config() -> ml_collections.ConfigDict:
    """DeepLabV2 (ResNetV1c-101, DLV2 adapter head) as in the reference configs."""
    return ml_collections.ConfigDict(
        dict(
            # resnet{18,34,50,101,152}_v1c | mit_b{0..5} | resnet101_caffe (ADVENT's) |
            # resnet101_proda (ProDA's)
            backbone="resnet101_v1c",
            # dlv2 | dlv2_sum | segformer | daformer | mmseg_segformer | advent_aspp | proda_aspp
            head="dlv2",
            num_classes=19,
            base_channels=64,  # ResNet width (mmseg base/stem channels); 64 in real models
            head_channels=256,  # DLV2: 2 ASPP branches x 128; SegFormer/DAFormer: embed dim
            dropout_ratio=0.1,
            drop_path_rate=0.1,  # MiT only
            mit_layout="nvlabs",  # MiT LayerNorm eps per checkpoint layout: nvlabs | mmseg
            dtype="float32",  # compute dtype: float32 | bfloat16 (params stay float32)
            remat=False,  # rematerialise backbone stages to save memory
            conv_impl="lax",  # ResNet/DLV2 convs: lax | im2col (about 2x faster training on CPU)
            # BatchNorm's batch statistics in training: two_pass (torch's numerics) | one_pass
            # (one all-reduce per layer and forward on a mesh; ddb_jax/models/batch_norm.py)
            bn_statistics="two_pass",
            # ADVENT's DeepLabV2: the auxiliary layer-3 classifier; blocks per stage.
            advent_multi_level=True,
            advent_blocks=(3, 4, 23, 3),
            # Classifier pairs on it (MTAF's MTKT: 1 + the targets; head 0 is evaluated).
            advent_heads=1,
            # ProDA's DeepLabV2 (resnet101_proda): blocks per stage; the extra BN on the
            # 2048-channel output of its stages 2/3 (SimCLRv2 students).
            proda_blocks=(3, 4, 23, 3),
            proda_bn_clr=False,
            # HRDA's multi-resolution segmentor (ddb_jax/models/hrda.py) around head 'daformer'
            # (MiT), 'dlv2_sum' or 'dlv2' (resnet*_v1c): the image at half resolution (context)
            # and a full-resolution detail crop, fused by a learnt scale attention
            # (attention_channels: its DAFormer head's width). crop_divisible (the detail
            # box's alignment) and detail_loss_weight are read by the training step. slide_detail:
            # inference runs the detail view in overlapping windows of the crop size.
            hrda=ml_collections.ConfigDict(
                dict(
                    enabled=False,
                    context_scale=0.5,
                    detail_crop=(512, 512),
                    crop_divisible=8,
                    detail_loss_weight=0.1,
                    attention_classwise=True,
                    attention_channels=256,
                    slide_detail=True,
                )
            ),
        )
    )


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # self_training | supervised | prototypes | ckd | evaluate | pipeline. 'supervised' is CE
    # on data.source only: the source-only baseline, or the oracle when given target labels.
    config.stage = "self_training"
    config.seed = 0
    config.model = get_model_config()
    # Where the initial weights come from: '' (random), or a converted checkpoint directory
    # (tools/convert_checkpoint.py), e.g. ImageNet resnet101_v1c or a round-1 CKD student.
    config.init_from = ""
    # A model directory to evaluate (stage 'evaluate'), e.g. a converted PyTorch checkpoint.
    config.checkpoint = ""

    # Data (docs/method.md §1.6). Dataset names: gta, synscapes, synthia, cityscapes,
    # mapillary, toy_source, toy_target, toy_hr_source, toy_hr_target. Several names =
    # multi-source / multi-target concatenation.
    config.data = ml_collections.ConfigDict(
        dict(
            root="data",
            source=("gta",),
            target=("cityscapes",),
            # A label set of ddb_jax/label_sets.py ('mtaf7', 'dada7': the papers' 7 classes,
            # files from the converters' --label-set); '' = the 19 Cityscapes train ids.
            # model.num_classes must match it.
            label_set="",
            crop_size=(512, 512),
            # The target's crop when it differs from the source's (ADVENT: whole images of
            # each domain's size, 720x1280 and 512x1024); () = crop_size.
            target_crop_size=(),
            flip_prob=0.5,  # random horizontal flip (ADVENT's loaders: 0)
            # One target stream per target dataset, batch keys 'target_image_<name>' (a method
            # that adapts to each target apart, e.g. MTAF), instead of one over their union.
            per_target_streams=False,
            # mmcv's keep-ratio resize to the dataset's (long, short) scale; False: exactly to
            # (width, height) = that scale (ADVENT's loaders: GTA 1280x720, Cityscapes 1024x512).
            keep_ratio=True,
            cat_max_ratio=0.75,
            # mmseg's PhotoMetricDistortion on the source images (the reference's CKD
            # stages; DDB's self-training stages do not use it).
            photometric_distortion=False,
            # Source batches also hold 'source_depth', SYNTHIA's inverse depth 65536/(d+1) with
            # the label's resize, crop and flip (DAF; convert with synthia.py --depth).
            source_depth=False,
            rare_class_sampling=False,
            rcs_temperature=0.01,
            rcs_min_pixels=3000,
            rcs_min_crop_ratio=0.5,  # HRDA: 2.0 (full-resolution crops hold 4x the pixels)
            # HRDA's pseudo-label margins (top, bottom, left, right) of the target images as
            # read: batches then hold 'target_valid', 0 where a crop pixel lies in them, and
            # the pseudo-labels there count nothing (HRDA on Cityscapes: (30, 240, 30, 30)).
            target_pseudo_margins=(0, 0, 0, 0),
            # dataset name -> (long, short) resize scale, or None to keep the size; overrides
            # the per-dataset table of input_pipeline/datasets.py.
            resize_scales={},
            num_parallel_calls=-1,  # tf.data.AUTOTUNE: one call per core, at most 16
            # Training images cross to the device as uint8 and are normalised there (a quarter
            # of float32's bytes; the same values); 'float32': normalised on the host.
            image_transfer="uint8",
            # ProDA's loaders (input_pipeline/proda.py): each image first resized to its
            # loader's fixed (H, W) (the target's is also the EMA's input and the offline label
            # stages' size), then to a width of proda_resize x U[0.5, 1.5], cropped to
            # crop_size and flipped; stages 2/3 ignore pseudo-label pixels whose confidence is
            # <= proda_threshold (the reference's --threshold).
            proda_resize=2200,
            proda_full_size=(1024, 2048),  # Cityscapes
            proda_source_size=(1052, 1914),  # GTA5; SYNTHIA: (760, 1280)
            proda_threshold=0.95,
        )
    )
    config.batch_size = 4  # global batch (the reference: 1 GPU x 4)
    config.mesh_devices = 0  # devices of the 'data' mesh axis; 0 = all
    # The train state's layouts on the device: 'row_major' (as checkpoints hold it) or
    # 'compiler' (those the step's compiler picks: on a GPU no per-step transposes of the conv
    # kernels to cuDNN's layout; same results; ddb_jax/train/state_layouts.py).
    config.state_layouts = "row_major"
    # Run on the CPU although the machine has a GPU or TPU (by default that is refused:
    # it usually means JAX's CPU build is installed; see the README's Install section).
    config.allow_cpu = False

    # Optimiser and schedule of the segmentor (mmcv AdamW + poly with linear warmup for DDB and
    # DAFormer; ADVENT's family: SGD). Parameter groups by mmcv-style custom keys: names
    # containing a head key get head_lr_mult x the rate, a frozen key never changes.
    config.optim = ml_collections.ConfigDict(
        dict(
            kind="adamw",  # adamw | adam | sgd
            momentum=0.9,  # sgd only
            head_keys=("head",),
            frozen_keys=(),
            max_iters=0,  # the poly schedule's length; 0 = num_steps
            # sgd: how often the reference's groups list each parameter, each listing stepped
            # by PyTorch 0.4.1's SGD ('' = once; 'advent_1x': ADVENT's 1x group).
            listed_times="",
            lr=6e-5,
            b1=0.9,
            b2=0.999,
            weight_decay=0.01,
            head_lr_mult=10.0,
            warmup_iters=1500,
            warmup_ratio=1e-6,
            poly_power=1.0,
            min_lr=0.0,
            # mmcv custom keys with decay_mult=0 (DAFormer: ('norm', 'pos_block')); DDB: none.
            no_decay_keys=(),
        )
    )
    config.num_steps = 40_000

    # Self-training (docs/method.md §1.1) and bridging (docs/method.md §1.3).
    config.st = ml_collections.ConfigDict(
        dict(
            mask="cut",  # cut | class | zero
            cut_area_ratio=0.4,
            ema_alpha=0.99,
            pseudo_threshold=0.968,
            pseudo_weight_ignore_top=0,
            pseudo_weight_ignore_bottom=0,
            color_jitter_p=0.8,
            color_jitter_strength=0.2,
            blur_p=0.5,
            # DAFormer's DACS draws (docs/method.md §1.3); DDB draws per image, blurs rows only.
            coins_per_batch=False,  # one jitter coin and one blur coin per batch
            blur_2d=False,  # 2-D blur kernel (rows from H, columns from W)
            classes_from_batch=False,  # class-mix chooses among the batch's label values
        )
    )
    # DAFormer's ImageNet feature distance (ddb_jax/methods/feature_distance.py): the
    # student's last backbone map on the source vs a frozen ImageNet backbone's, on the
    # cells of thing classes. imnet_from: that backbone's model directory (required).
    config.fdist = ml_collections.ConfigDict(
        dict(
            enabled=False,
            weight=0.005,
            classes=THING_CLASSES,  # () = every pixel
            min_ratio=0.75,
            imnet_from="",
        )
    )
    # MIC's masked image consistency (ddb_jax/methods/mic.py), an option of every
    # self-training stage: the colour-augmented target with blocks hidden, trained on the
    # EMA teacher's pseudo-labels and quality weight. Blocks of 32 pixels for crops of
    # half-resolution images, as MIC's experiments.py sets them ("half the patch size when
    # training with half resolution"); its 64 is for HRDA's full-resolution crops.
    config.mic = ml_collections.ConfigDict(
        dict(enabled=False, block_size=32, mask_ratio=0.7, weight=1.0, color_augment=True)
    )

    # Cross-path knowledge distillation (docs/method.md §1.5), stage 'ckd'. Teachers are
    # model directories (a self-training stage's export/), prototypes the prototypes.npz of
    # stage 'prototypes'.
    config.ckd = ml_collections.ConfigDict(
        dict(
            teacher_cu="",
            teacher_ca="",
            prototypes_cu="",
            prototypes_ca="",
            proto_rectify=True,  # the DDB configs set it (the reference's base default is off)
            rectify_on_prob=True,  # False: rectify logits instead of probabilities
            prototypes_at_feature_resolution=False,  # the cheaper, inexact path (prototypes.py)
            use_pl_weight=False,  # weight pseudo-labels by confidence (st.pseudo_threshold)
            soft_distill=False,  # KL to the temperature-softened ensemble instead of hard labels
            soft_distill_weight=0.1,
            temperature=1.0,
            teacher_dtype="float32",  # float32 | bfloat16 (frozen teachers' compute)
        )
    )
    # Prototypes (docs/method.md §1.4), stage 'prototypes': the model in config.checkpoint
    # over the target training set with its training augmentation; writes
    # workdir/prototypes.npz. mode 'proda': ProDA's calc_prototype.py instead (whole images at
    # data.proda_full_size, no augmentation, features and argmax at the network's resolution).
    config.prototypes = ml_collections.ConfigDict(
        dict(num_passes=4, batch_size=4, min_pixels=10, count_cap=3000, mode="ddb")
    )
    # Each training method's own settings (ddb_jax/methods/registry.py), e.g. config.advent.
    for section, defaults in methods.registry.config_sections().items():
        config[section] = defaults()

    # Stage 'pipeline' (ddb_jax/graph/rounds.py): DDB's rounds, the optional baseline rows
    # ('source_only', 'oracle'), round 2's learning rate (the reference's r2 configs: a
    # tenth), and a comma-separated subset of stages to run ('' = all), e.g.
    # --config.stages=r1_ckd,r2_cu. Per-stage overrides: config.pipeline.<stage>.<key>.
    # The method's pipeline (ddb_jax/graph/rounds.py GRAPHS): 'ddb' (DDB's rounds) | 'advent'.
    config.graph = "ddb"
    config.rounds = 2
    config.baselines = ()
    config.round2_lr_scale = 0.1
    config.stages = ""
    # Repeated runs of the whole chain, one per seed, in workdir/seed<s>/ (e.g. (0, 1, 2));
    # () runs config.seed alone in workdir/. The summary gives mean and standard deviation.
    config.seeds = ()
    # Stages that do not depend on each other (a round's paths, their prototypes, the
    # seeds) run at once on disjoint groups of this process's devices.
    config.concurrent_stages = True

    # Logging, evaluation and checkpoints.
    config.log_every = 50
    config.image_summary_every = 1000
    config.eval_every = 4000  # 0 = no evaluation during training
    config.checkpoint_every = 4000
    config.keep_checkpoints = 3
    config.eval = ml_collections.ConfigDict(
        dict(
            mode="whole",  # whole | slide
            crop_size=(512, 512),
            stride=(341, 341),
            flip=False,
            batch_size=1,
            split="val",
            save_predictions=False,  # write colourised predictions (stage 'evaluate')
            # Extra mIoUs from the same confusion matrix (ddb_jax/labels.py MIOU_PROTOCOLS):
            # 'synthia16', 'synthia13' (SYNTHIA's 16 / 13 classes), 'categories7_merged' (the
            # 19 classes merged into 7 categories; not the papers' 7-class protocols, which
            # are data.label_set). 'categories7' is its former name, an alias.
            miou_protocols=(),
            # Stage 'evaluate': a second model whose logits are added to config.checkpoint's,
            # weighted (ADVENT's AdvEnt + MinEnt: 0.5 each).
            ensemble_checkpoint="",
            ensemble_weights=(0.5, 0.5),
        )
    )
    return config
