"""Config keys of SDCoNet, added to a detectron2 ``get_cfg()`` by :func:`add_sdconet_config`.

Every key has a comment saying what it does and where its default comes from ("SDCoNet: x" =
the value of the SDCoNet paper / release). :func:`get_sdconet_cfg` is the one way tools and the
predictor build a config; the allowed values are the table in ``config_checks.py``.
"""
import logging
from typing import Sequence, Union

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .config_checks import check_sdconet_config


def get_sdconet_cfg(path_or_cfg: Union[str, CN, None] = None, opts: Sequence = (), *,
                    freeze: bool = True, cpu_fallback: bool = False) -> CN:
    """The one way to make an SDCoNet config: detectron2 defaults + SDCoNet keys, the yaml file
    (or a copy of the given config), ``opts`` merged on top, checked, frozen.

    ``opts`` is a flat ``[KEY, VALUE, ...]`` list like detectron2's command line. Tools express
    their own adjustments as opts too (e.g. :func:`lr_input_opts`). With ``cpu_fallback`` a CUDA
    device becomes "cpu" (with a warning) when CUDA is missing, before the checks.
    """
    if isinstance(path_or_cfg, CN):
        cfg = path_or_cfg.clone()
        cfg.defrost()
        add_sdconet_config(cfg)
    else:
        cfg = add_sdconet_config(get_cfg())
        if path_or_cfg:
            cfg.merge_from_file(str(path_or_cfg))
    cfg.merge_from_list(list(opts))
    if cpu_fallback and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("sdconet").warning("CUDA is not available: running on CPU (MODEL.DEVICE=cpu)")
        cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    check_sdconet_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def lr_input_opts() -> list:
    """Overrides for test images that already are the low-quality input (train_net --lr-input,
    predict): use them as they are, and no SR quality (there is no HR reference)."""
    return ["MODEL.SDCONET.DEGRADE.TEST", False, "TEST.SDCONET.SR_QUALITY", False]


def add_sdconet_config(cfg):
    """Add the ``MODEL.SDCONET``, data and solver keys SDCoNet uses (idempotent)."""
    if hasattr(cfg.MODEL, "SDCONET"):
        return cfg
    _C = cfg
    _C.MODEL.SDCONET = CN()
    # Number of object classes; must match the dataset's thing_classes.
    _C.MODEL.SDCONET.NUM_CLASSES = 10
    # Compute fp32 Linear layers on CPU with oneDNN instead of MKL (layers/onednn_linear.py):
    # faster products on the CPUs measured in BENCHMARKS.md, the same maths up to summation order.
    # GPUs, autocast and export use the stock F.linear whatever this says.
    _C.MODEL.SDCONET.ONEDNN_LINEAR = True

    # ---------------------------------------------------------------- degradation
    # How the low-quality input is made from the HR image, inside the model.
    _C.MODEL.SDCONET.DEGRADE = CN()
    # Down-sampling factor s: the LR input is H/s x W/s. One of 1, 2, 4.
    _C.MODEL.SDCONET.DEGRADE.SCALE = 2
    # Interpolation used to shrink the image: "bicubic" (the benchmark) or "bilinear" or "area".
    _C.MODEL.SDCONET.DEGRADE.MODE = "bicubic"
    # Gaussian blur sigma range (HR pixels) drawn per image before down-sampling; (0, 0) = no blur.
    _C.MODEL.SDCONET.DEGRADE.BLUR_SIGMA = (0.0, 0.0)
    # Additive Gaussian noise std range, in 0-255 pixel units, drawn per image; (0, 0) = none.
    _C.MODEL.SDCONET.DEGRADE.NOISE_STD = (0.0, 0.0)
    # Seed of the degradation's own random generator (blur/noise); -1 = draw from torch's global RNG.
    _C.MODEL.SDCONET.DEGRADE.SEED = -1
    # Degrade test images too (benchmark protocol: HR tiles in, LR seen). False = the test
    # images already are the real low-quality input and are used as they are.
    _C.MODEL.SDCONET.DEGRADE.TEST = True

    # ---------------------------------------------------------------- Swin backbone (timm)
    _C.MODEL.SDCONET.SWIN = CN()
    # timm model name ("swin_tiny_patch4_window7_224", "swin_small_...", "swin_base_...") or
    # "custom" to build from EMBED_DIM / DEPTHS / NUM_HEADS below (tiny configs).
    _C.MODEL.SDCONET.SWIN.NAME = "swin_tiny_patch4_window7_224"
    # Width of stage 1 (custom only; the timm name fixes it otherwise).
    _C.MODEL.SDCONET.SWIN.EMBED_DIM = 96
    # Blocks per stage (custom only).
    _C.MODEL.SDCONET.SWIN.DEPTHS = (2, 2, 6, 2)
    # Attention heads per stage (custom only).
    _C.MODEL.SDCONET.SWIN.NUM_HEADS = (3, 6, 12, 24)
    # Attention window size in tokens (custom only; SDCoNet: 7).
    _C.MODEL.SDCONET.SWIN.WINDOW_SIZE = 7
    # Stochastic depth rate, linearly increasing over blocks (SDCoNet: 0.2).
    _C.MODEL.SDCONET.SWIN.DROP_PATH_RATE = 0.2
    # Stages whose weights are frozen: 0 = none, 1 = patch embed, k = patch embed + stages 1..k-1.
    _C.MODEL.SDCONET.SWIN.FREEZE_AT = 0
    # Local path of ImageNet weights (official Swin .pth or timm keys), $VAR / ${VAR} / ~ expanded;
    # Base-SDCoNet.yaml sets ${SDCONET_WEIGHTS}/swin_tiny_patch4_window7_224.pth. "none" = random init
    # on purpose (warning). "" = not given: random init for a "custom" Swin (tiny configs), but an
    # error for a named timm Swin, as is a missing file, unless MODEL.WEIGHTS provides the backbone.
    # The default stays "" because the file depends on NAME: forgotten weights fail, never pass silently.
    _C.MODEL.SDCONET.SWIN.PRETRAINED = ""
    # Backbone outputs fed to the neck (res2 = stride 4 ... res5 = stride 32 of the LR input).
    _C.MODEL.SDCONET.SWIN.OUT_FEATURES = ("res3", "res4", "res5")
    # Recompute Swin blocks in backward to save memory (torch.utils.checkpoint).
    _C.MODEL.SDCONET.SWIN.USE_CHECKPOINT = False

    # ---------------------------------------------------------------- neck
    _C.MODEL.SDCONET.NECK = CN()
    # "FPN" (top-down fusion, default) or "ChannelMapper" (the authors' release).
    _C.MODEL.SDCONET.NECK.NAME = "FPN"
    # Channels of every neck level (= transformer width).
    _C.MODEL.SDCONET.NECK.OUT_CHANNELS = 256
    # Extra stride-2 levels made from the last backbone feature (SDCoNet: one, stride 64).
    _C.MODEL.SDCONET.NECK.NUM_EXTRA_LEVELS = 1

    # ---------------------------------------------------------------- transformer
    _C.MODEL.SDCONET.TRANSFORMER = CN()
    # Deformable encoder layers (SDCoNet: 6).
    _C.MODEL.SDCONET.TRANSFORMER.ENC_LAYERS = 6
    # DINO decoder layers (SDCoNet: 6).
    _C.MODEL.SDCONET.TRANSFORMER.DEC_LAYERS = 6
    # Attention heads in encoder and decoder.
    _C.MODEL.SDCONET.TRANSFORMER.NUM_HEADS = 8
    # Sampling points per head and level in deformable attention.
    _C.MODEL.SDCONET.TRANSFORMER.NUM_POINTS = 4
    # Hidden width of the feed-forward layers.
    _C.MODEL.SDCONET.TRANSFORMER.FFN_DIM = 2048
    # Dropout in attention and FFN (SDCoNet: 0).
    _C.MODEL.SDCONET.TRANSFORMER.DROPOUT = 0.0
    # Object queries selected by two-stage mixed query selection (SDCoNet: 300).
    _C.MODEL.SDCONET.TRANSFORMER.NUM_QUERIES = 300
    # Temperature of the sine position encoding of feature maps (DINO and SDCoNet: 20).
    _C.MODEL.SDCONET.TRANSFORMER.POS_TEMPERATURE = 20
    # Detections kept per image at inference: top-k over (query, class) pairs.
    _C.MODEL.SDCONET.TRANSFORMER.NUM_DETECTIONS = 300
    # Deformable-attention sampling: "auto" (embedding_bag on CPU, grid_sample on GPU and when
    # exporting), or force "grid_sample", "embedding_bag" or "gather"; all exact (see ms_deform_attn.py).
    _C.MODEL.SDCONET.TRANSFORMER.DEFORM_IMPL = "auto"
    # Wrap the sampling in torch.compile (falls back with a warning if compilation fails); measured
    # slower than embedding_bag on CPU, so off by default.
    _C.MODEL.SDCONET.TRANSFORMER.DEFORM_COMPILE = False

    # ---------------------------------------------------------------- contrastive denoising
    _C.MODEL.SDCONET.DN = CN()
    # Positive denoising queries per image (SDCoNet: 100). As in DINO / mmdet, every group adds as many
    # negatives, so the DN part holds up to 2x this (one group of 2 x the objects if an image has more).
    _C.MODEL.SDCONET.DN.NUM_QUERIES = 100
    # Label noise: a fraction LABEL_NOISE * 0.5 of DN labels is replaced at random.
    _C.MODEL.SDCONET.DN.LABEL_NOISE = 0.5
    # Box noise scale (relative to box size; negatives get between 1x and 2x this).
    _C.MODEL.SDCONET.DN.BOX_NOISE = 1.0

    # ---------------------------------------------------------------- matcher
    _C.MODEL.SDCONET.MATCHER = CN()
    # Hungarian matching costs: focal class / L1 box (cxcywh) / GIoU.
    _C.MODEL.SDCONET.MATCHER.COST_CLASS = 2.0
    _C.MODEL.SDCONET.MATCHER.COST_BBOX = 5.0
    _C.MODEL.SDCONET.MATCHER.COST_GIOU = 2.0

    # ---------------------------------------------------------------- losses
    _C.MODEL.SDCONET.LOSS = CN()
    # Weights of the sigmoid focal, L1 and GIoU losses (SDCoNet: 1 / 5 / 2).
    _C.MODEL.SDCONET.LOSS.CLASS_WEIGHT = 1.0
    _C.MODEL.SDCONET.LOSS.BBOX_WEIGHT = 5.0
    _C.MODEL.SDCONET.LOSS.GIOU_WEIGHT = 2.0
    # Sigmoid focal loss alpha / gamma.
    _C.MODEL.SDCONET.LOSS.FOCAL_ALPHA = 0.25
    _C.MODEL.SDCONET.LOSS.FOCAL_GAMMA = 2.0

    # ---------------------------------------------------------------- SR branch
    # Super-resolution decoder on the shared Swin, see sdconet/modeling/sr_decoder.py.
    _C.MODEL.SDCONET.SR = CN()
    # Train the SR branch (training only; inference never runs it).
    _C.MODEL.SDCONET.SR.ENABLED = False
    # "residual" (ours: bicubic upsampling of the LR input + a learned residual at full HR
    # resolution, zero at initialisation, so the branch starts at bicubic), "x2_bilinear"
    # (release: learned to LR/2, then bilinear to HR; capped below bicubic, tools/sr_head_ceiling.py) or
    # "full" (learned PixelShuffle upsampling all the way to HR, no bilinear; an ablation).
    _C.MODEL.SDCONET.SR.HEAD = "residual"
    # Channels of the residual head's convolutions at LR resolution (measured in MODEL_CARD.md).
    _C.MODEL.SDCONET.SR.RESIDUAL_FEATURES = 32
    # 3x3 convolutions between the merged token + pixel features and the PixelShuffle output.
    _C.MODEL.SDCONET.SR.RESIDUAL_CONVS = 1
    # Swin blocks per decoder stage, deepest first (SDCoNet: 2, 6, 2, 2).
    _C.MODEL.SDCONET.SR.DEPTHS = (2, 6, 2, 2)
    # Attention heads per decoder stage; each must divide its width (8, 4, 2, 1 x the backbone
    # embed dim). SDCoNet: 6, 12, 6, 3 for Swin-T. Empty = derive width // 32 (tiny widths).
    _C.MODEL.SDCONET.SR.NUM_HEADS = (6, 12, 6, 3)
    # Attention window of the decoder blocks in tokens (SDCoNet: 8).
    _C.MODEL.SDCONET.SR.WINDOW_SIZE = 8
    # MLP hidden width / block width in the decoder blocks (SDCoNet: 2).
    _C.MODEL.SDCONET.SR.MLP_RATIO = 2.0
    # Stochastic depth, linearly increasing over the decoder blocks (SDCoNet: 0.1).
    _C.MODEL.SDCONET.SR.DROP_PATH_RATE = 0.1
    # Weight of the L1 loss against the normalised HR image (SDCoNet: 5.0).
    _C.MODEL.SDCONET.SR.LOSS_WEIGHT = 5.0

    # ---------------------------------------------------------------- saliency
    # Multi-scale saliency predictor and its box-derived loss, see sdconet/modeling/saliency.py.
    _C.MODEL.SDCONET.SALIENCY = CN()
    # Predict per-token saliency and train it with the soft-target focal loss.
    _C.MODEL.SDCONET.SALIENCY.ENABLED = False
    # Top-down mixing weights: "learnable" (Salience-DETR, U(-0.3, 0.3) init) or "fixed" (all 1.0,
    # not trained: the release's gradient-routing "alpha ablation").
    _C.MODEL.SDCONET.SALIENCY.ALPHA = "learnable"
    # Weight of the saliency loss (SDCoNet: 2.0).
    _C.MODEL.SDCONET.SALIENCY.LOSS_WEIGHT = 2.0
    # Focal weighting of the soft-target BCE (SDCoNet: 0.25 / 2).
    _C.MODEL.SDCONET.SALIENCY.FOCAL_ALPHA = 0.25
    _C.MODEL.SDCONET.SALIENCY.FOCAL_GAMMA = 2.0
    # Per neck level (fine -> coarse), the (lo, hi] range of max(l, t, r, b) in HR pixels for which a
    # token inside a box is positive (100000 stands for infinity).
    _C.MODEL.SDCONET.SALIENCY.RANGES = ((-1, 64), (64, 128), (128, 256), (256, 100000))
    # Token selection. Per neck level, the fraction of valid tokens the encoder keeps,
    # ranked by saliency (Salience-DETR: 0.4, 0.8, 1, 1; the release: all 1.0 = nothing dropped).
    _C.MODEL.SDCONET.SALIENCY.LEVEL_RATIOS = (0.4, 0.8, 1.0, 1.0)
    # Per encoder layer, the fraction of the kept tokens it updates (one value per ENC_LAYERS;
    # Salience-DETR: 1, .8, .6, .6, .4, .2; the release: all 1.0).
    _C.MODEL.SDCONET.SALIENCY.LAYER_RATIOS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    # Tokens that attend to each other in the pre-attention of every encoder layer (release: 100).
    _C.MODEL.SDCONET.SALIENCY.TOPK_PRE_ATTENTION = 100
    # Rank pre-attention tokens with the trained encoder class head (True, Salience-DETR) or with a
    # separate Linear that never receives a gradient (False, the release's bug).
    _C.MODEL.SDCONET.SALIENCY.SHARED_SCORER = True
    # How the pre-attention ranks tokens: "logit_product" (max class logit x saliency logit, the
    # release; two negative logits rank high) or "sigmoid" (product of the two probabilities).
    _C.MODEL.SDCONET.SALIENCY.PRE_ATTENTION_SCORE = "logit_product"

    # ---------------------------------------------------------------- serial baseline
    # SerialSRDetector (META_ARCHITECTURE): an SR network (own Swin + SR decoder) makes the SR
    # image, a second Swin + the same DINO detects on it (DINO_SR_TS / SA_DINO_SR_TS).
    _C.MODEL.SDCONET.SERIAL = CN()
    # Detach the SR image before detection (True: DINO_SR_TS, SR and detection trained apart;
    # False: SA_DINO_SR_TS, detection gradients flow into the SR network).
    _C.MODEL.SDCONET.SERIAL.DETACH = True

    # ---------------------------------------------------------------- data
    # Input pixels are read as BGR like detectron2; mean/std below are ImageNet's, in BGR order.
    _C.MODEL.PIXEL_MEAN = [103.53, 116.28, 123.675]
    _C.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    # Training augmentations: random flips and 90-degree rotations (remote-sensing standard), then the
    # optional scale / photometric jitter and mosaic (all off by default: the release trains with flips only).
    _C.INPUT.SDCONET = CN()
    # Probability of a horizontal flip.
    _C.INPUT.SDCONET.HFLIP_PROB = 0.5
    # Probability of a vertical flip.
    _C.INPUT.SDCONET.VFLIP_PROB = 0.0
    # Apply a random multiple of 90 degrees rotation (square tiles keep their size).
    _C.INPUT.SDCONET.ROT90 = False
    # Large-scale jitter (sdconet/data/augmentations.py): resize by a random factor in (low, high),
    # aspect kept, then crop a random tile-sized window (factor > 1) or pad on the right and bottom
    # with black, value 0 (factor < 1): the output keeps the tile size. Boxes cut by the crop are
    # clipped, those left under MIN_BOX_SIZE dropped. (1.0, 1.0) = off; e.g. (0.5, 1.5).
    _C.INPUT.SDCONET.SCALE_JITTER = (1.0, 1.0)
    # Photometric jitter, applied before the scale jitter (padding stays black); boxes are unchanged.
    # Largest relative brightness change v: pixels times a factor in [1 - v, 1 + v]; 0 = off, e.g. 0.3.
    _C.INPUT.SDCONET.BRIGHTNESS = 0.0
    # Largest relative contrast change: blend with the image's mean by a factor in [1 - v, 1 + v]; 0 = off.
    _C.INPUT.SDCONET.CONTRAST = 0.0
    # Largest relative saturation change: blend with the gray image by a factor in [1 - v, 1 + v]; 0 = off.
    _C.INPUT.SDCONET.SATURATION = 0.0
    # Largest hue shift, as a fraction of the hue circle (0.5 = 180 degrees; 8-bit OpenCV HSV, so in
    # steps of 1/180); 0 = off, e.g. 0.015.
    _C.INPUT.SDCONET.HUE = 0.0
    # Boxes narrower or shorter than this (HR pixels, after clipping) are dropped and counted.
    _C.INPUT.SDCONET.MIN_BOX_SIZE = 1.0
    # Reading of multi-band / 12-16-bit imagery (sdconet/data/image_io.py), the same in training,
    # evaluation and prediction. TIFF / GeoTIFF go through rasterio, PNG / JPEG through OpenCV.
    # Bands shown as (R, G, B), numbered from 1 in file order (colour files: R=1, G=2, B=3), or one
    # band shown as gray; () = the first three bands (the first as gray for 1-2 band files).
    # E.g. (4, 3, 2) for true colour from Sentinel-2 / Landsat-8 style band stacks.
    _C.INPUT.SDCONET.BANDS = ()
    # How data that is not 8-bit becomes 0-255 (8-bit data is used as it is): "percentile" maps
    # the PERCENTILES of each image (all chosen bands together, keeping colours) to 0 and 255;
    # "max" maps 0..MAX_VALUE to 0..255 (fixed: the same brightness for every scene and tile).
    _C.INPUT.SDCONET.SCALING = "percentile"
    # (low, high) percentiles of the "percentile" stretch, in [0, 100].
    _C.INPUT.SDCONET.PERCENTILES = (0.0, 99.9)
    # Value shown as 255 by "max" scaling (an integer); 0 = the data type's maximum (65535 for
    # 16-bit, 1.0 for float data). E.g. 4095 for 12-bit data stored in 16-bit files.
    _C.INPUT.SDCONET.MAX_VALUE = 0
    # Mosaic (sdconet/data/mosaic.py): probability that a training sample becomes a 2x2 mosaic of
    # its tile and three random ones around a random centre, on a canvas of the tile's size. Tiles
    # are cropped at full resolution, not shrunk (tiny objects keep their size); boxes are clipped
    # to their corner, those left under MIN_BOX_SIZE dropped. The flips, rotations and jitter above
    # follow. 0 = off; e.g. 0.5-1.0 for training from scratch.
    _C.INPUT.SDCONET.MOSAIC_PROB = 0.0
    # Fraction of SOLVER.MAX_ITER at the end of training without mosaics (whole tiles, as at test
    # time): none from iteration MAX_ITER - round(MAX_ITER x this) on. 0 = mosaics to the end; e.g. 0.1.
    _C.INPUT.SDCONET.MOSAIC_OFF_LAST = 0.0

    # ---------------------------------------------------------------- evaluation
    _C.TEST.SDCONET = CN()
    # COCO evaluation backend of SmallObjectCOCOEvaluator: "auto" (faster-coco-eval when
    # installed, else pycocotools), "faster" or "pycocotools". Its detection cap is
    # TEST.DETECTIONS_PER_IMAGE.
    _C.TEST.SDCONET.COCO_BACKEND = "auto"
    # Which detections each COCO number counts: "coco" reads every AP at the detection cap
    # (TEST.DETECTIONS_PER_IMAGE); "mmdet" reports as MMDetection's CocoMetric (maxDets 100, 300,
    # 1000: AP at 100, AP50/AP75/APs/APm/APl and the tiny bands at 1000), the protocol of the
    # SDCoNet paper's numbers. The paper configs use "mmdet".
    _C.TEST.SDCONET.PROTOCOL = "coco"
    # Also measure PSNR/SSIM (Y channel) of the SR branch's output against the HR image, next to
    # bicubic upsampling of the LR input (runs the SR decoder at test time; needs SR.ENABLED and
    # degraded test images, DEGRADE.TEST True).
    _C.TEST.SDCONET.SR_QUALITY = False
    # Mixed precision at test time (evaluation, predictor, tiling, pictures).
    _C.TEST.SDCONET.AMP = CN()
    # Run the network under torch.autocast; boxes and scores are post-processed in fp32. Off by
    # default: it changes the numbers (bf16 keeps 8 bits of mantissa). It pays on CPUs with native
    # bf16 (AVX512-BF16 / AMX; a warning says when the CPU lacks it) and on GPUs. Export ignores it.
    _C.TEST.SDCONET.AMP.ENABLED = False
    # "bfloat16" (CPU and CUDA) or "float16" (CUDA only).
    _C.TEST.SDCONET.AMP.DTYPE = "bfloat16"

    # ---------------------------------------------------------------- solver
    # "ADAMW" (the paper's) or "SGD".
    _C.SOLVER.OPTIMIZER = "ADAMW"
    # LR multiplier of the backbone parameters (SDCoNet: 0.1).
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Clip the L2 norm of all gradients together (full model); <= 0 disables (SDCoNet: 0.1).
    _C.SOLVER.FULL_MODEL_CLIP_NORM = 0.1
    # Training-time budget in seconds (a float): once the training steps (data loading included;
    # checkpoints and evaluations not) have taken this long, training ends as at MAX_ITER, with
    # model_final and the final evaluation. The time goes on counting across --resume and is logged
    # as train_seconds. For comparing configs at equal time (tools/compare.py --budget-seconds); the
    # LR schedule still follows MAX_ITER and STEPS. 0 = no budget.
    _C.SOLVER.TIME_BUDGET_SECONDS = 0.0

    # Gradient routing between the SR and detection tasks, GradientRoutingTrainer.
    _C.SOLVER.GRADIENT_ROUTING = CN()
    # Iteration at which phase 2 starts. Before it (phase 1) the SR decoder is frozen and not run
    # at all; 0 = SR from the first iteration (release: 16 of 52 epochs).
    _C.SOLVER.GRADIENT_ROUTING.START_ITER = 0
    # How the SR gradient meets the detection gradient on the shared parameters in phase 2:
    # "sum" (the release: plain sum of the losses), "project" (PCGrad-style: remove from the SR
    # gradient its component against the detection gradient; not in the release) or "stop"
    # (the SR gradient never reaches the shared parameters; only the SR decoder learns from it).
    _C.SOLVER.GRADIENT_ROUTING.MODE = "sum"
    # Where "project" measures the conflict: "per_tensor" (each shared parameter tensor on its
    # own) or "global" (all shared parameters as one vector).
    _C.SOLVER.GRADIENT_ROUTING.PROJECTION = "per_tensor"
    # Log the cosine similarity / conflict fraction of the two gradients every this many
    # iterations (needs the two backward passes, which "sum" otherwise merges); 0 = never.
    _C.SOLVER.GRADIENT_ROUTING.LOG_PERIOD = 20

    # Mixed precision (detectron2's SOLVER.AMP.ENABLED switches it on): the autocast dtype.
    # "bfloat16" (CPU and CUDA, no loss scaling) or "float16" (CUDA only, with a GradScaler).
    _C.SOLVER.AMP.DTYPE = "bfloat16"

    # Exponential moving average of the weights, kept in checkpoints; evaluation uses it.
    _C.SOLVER.EMA = CN()
    # Keep an EMA copy of the weights.
    _C.SOLVER.EMA.ENABLED = False
    # EMA decay per iteration (0.9998 in recent DETR recipes; smaller for short runs).
    _C.SOLVER.EMA.DECAY = 0.9998
    return cfg

