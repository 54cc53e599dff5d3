"""Config keys of SDCoNet, added to a detectron2 ``get_cfg()`` by :func:`add_sdconet_config`.

Every key has a comment saying what it does and where its default comes from
("spec §x" = ../shared/reference/sdconet_spec.md). :func:`check_sdconet_config` turns
impossible values into an error that names the key.
"""
from detectron2.config import CfgNode as CN


def add_sdconet_config(cfg):
    """Add the ``MODEL.SDCONET``, data and solver keys SDCoNet uses (idempotent)."""
    if hasattr(cfg.MODEL, "SDCONET"):
        return cfg
    _C = cfg
    _C.MODEL.SDCONET = CN()
    # Number of object classes; must match the dataset's thing_classes.
    _C.MODEL.SDCONET.NUM_CLASSES = 10
    # Compute fp32 Linear layers on CPU with oneDNN instead of MKL (modeling/onednn_linear.py):
    # 1.1-1.6x faster products on AMD EPYC CPUs, the same maths up to summation order. GPUs,
    # autocast and export use the stock F.linear whatever this says.
    _C.MODEL.SDCONET.ONEDNN_LINEAR = True

    # ---------------------------------------------------------------- degradation
    # How the low-quality input is made from the HR image, inside the model (spec §6.2).
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
    # Attention window size in tokens (custom only; spec §3.1: 7).
    _C.MODEL.SDCONET.SWIN.WINDOW_SIZE = 7
    # Stochastic depth rate, linearly increasing over blocks (spec §3.1: 0.2).
    _C.MODEL.SDCONET.SWIN.DROP_PATH_RATE = 0.2
    # Stages whose weights are frozen: 0 = none, 1 = patch embed, k = patch embed + stages 1..k-1.
    _C.MODEL.SDCONET.SWIN.FREEZE_AT = 0
    # Local path of ImageNet weights (official Swin .pth or timm keys); "" = random init.
    _C.MODEL.SDCONET.SWIN.PRETRAINED = ""
    # Backbone outputs fed to the neck (res2 = stride 4 ... res5 = stride 32 of the LR input).
    _C.MODEL.SDCONET.SWIN.OUT_FEATURES = ("res3", "res4", "res5")
    # Recompute Swin blocks in backward to save memory (torch.utils.checkpoint).
    _C.MODEL.SDCONET.SWIN.USE_CHECKPOINT = False

    # ---------------------------------------------------------------- neck
    _C.MODEL.SDCONET.NECK = CN()
    # "FPN" (top-down fusion, default) or "ChannelMapper" (the authors' release, spec §2).
    _C.MODEL.SDCONET.NECK.NAME = "FPN"
    # Channels of every neck level (= transformer width).
    _C.MODEL.SDCONET.NECK.OUT_CHANNELS = 256
    # Extra stride-2 levels made from the last backbone feature (spec §2: one, stride 64).
    _C.MODEL.SDCONET.NECK.NUM_EXTRA_LEVELS = 1

    # ---------------------------------------------------------------- transformer
    _C.MODEL.SDCONET.TRANSFORMER = CN()
    # Deformable encoder layers (spec §3.4: 6).
    _C.MODEL.SDCONET.TRANSFORMER.ENC_LAYERS = 6
    # DINO decoder layers (spec §3.5: 6).
    _C.MODEL.SDCONET.TRANSFORMER.DEC_LAYERS = 6
    # Attention heads in encoder and decoder.
    _C.MODEL.SDCONET.TRANSFORMER.NUM_HEADS = 8
    # Sampling points per head and level in deformable attention.
    _C.MODEL.SDCONET.TRANSFORMER.NUM_POINTS = 4
    # Hidden width of the feed-forward layers.
    _C.MODEL.SDCONET.TRANSFORMER.FFN_DIM = 2048
    # Dropout in attention and FFN (spec: 0).
    _C.MODEL.SDCONET.TRANSFORMER.DROPOUT = 0.0
    # Object queries selected by two-stage mixed query selection (spec §3.5: 300).
    _C.MODEL.SDCONET.TRANSFORMER.NUM_QUERIES = 300
    # Temperature of the sine position encoding of feature maps (DINO: 20, spec §3.5).
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
    # Positive denoising queries per image (spec: 100). As in DINO / mmdet, every group adds as many
    # negatives, so the DN part holds up to 2x this (one group of 2 x the objects if an image has more).
    _C.MODEL.SDCONET.DN.NUM_QUERIES = 100
    # Label noise: a fraction LABEL_NOISE * 0.5 of DN labels is replaced at random.
    _C.MODEL.SDCONET.DN.LABEL_NOISE = 0.5
    # Box noise scale (relative to box size; negatives get between 1x and 2x this).
    _C.MODEL.SDCONET.DN.BOX_NOISE = 1.0

    # ---------------------------------------------------------------- matcher
    _C.MODEL.SDCONET.MATCHER = CN()
    # Hungarian matching costs: focal class / L1 box (cxcywh) / GIoU (spec §3.5).
    _C.MODEL.SDCONET.MATCHER.COST_CLASS = 2.0
    _C.MODEL.SDCONET.MATCHER.COST_BBOX = 5.0
    _C.MODEL.SDCONET.MATCHER.COST_GIOU = 2.0

    # ---------------------------------------------------------------- losses
    _C.MODEL.SDCONET.LOSS = CN()
    # Weights of the sigmoid focal, L1 and GIoU losses (spec §4: 1 / 5 / 2).
    _C.MODEL.SDCONET.LOSS.CLASS_WEIGHT = 1.0
    _C.MODEL.SDCONET.LOSS.BBOX_WEIGHT = 5.0
    _C.MODEL.SDCONET.LOSS.GIOU_WEIGHT = 2.0
    # Sigmoid focal loss alpha / gamma.
    _C.MODEL.SDCONET.LOSS.FOCAL_ALPHA = 0.25
    _C.MODEL.SDCONET.LOSS.FOCAL_GAMMA = 2.0

    # ---------------------------------------------------------------- SR branch
    # Super-resolution decoder on the shared Swin (spec §3.2), see sdconet/modeling/sr_decoder.py.
    _C.MODEL.SDCONET.SR = CN()
    # Train the SR branch (training only; inference never runs it).
    _C.MODEL.SDCONET.SR.ENABLED = False
    # "x2_bilinear" (release: learned to LR/2, then bilinear to HR) or "full" (learned
    # PixelShuffle upsampling all the way to HR, no bilinear; spec §3.2 ablation / bug 6).
    _C.MODEL.SDCONET.SR.HEAD = "x2_bilinear"
    # Swin blocks per decoder stage, deepest first (spec §3.2: 2, 6, 2, 2).
    _C.MODEL.SDCONET.SR.DEPTHS = (2, 6, 2, 2)
    # Attention heads per decoder stage; each must divide its width (8, 4, 2, 1 x the backbone
    # embed dim). Spec §3.2: 6, 12, 6, 3 for Swin-T. Empty = derive width // 32 (tiny widths).
    _C.MODEL.SDCONET.SR.NUM_HEADS = (6, 12, 6, 3)
    # Attention window of the decoder blocks in tokens (spec §3.2: 8).
    _C.MODEL.SDCONET.SR.WINDOW_SIZE = 8
    # MLP hidden width / block width in the decoder blocks (spec §3.2: 2).
    _C.MODEL.SDCONET.SR.MLP_RATIO = 2.0
    # Stochastic depth, linearly increasing over the decoder blocks (spec §3.2: 0.1).
    _C.MODEL.SDCONET.SR.DROP_PATH_RATE = 0.1
    # Weight of the L1 loss against the normalised HR image (spec §4: 5.0).
    _C.MODEL.SDCONET.SR.LOSS_WEIGHT = 5.0

    # ---------------------------------------------------------------- saliency
    # Multi-scale saliency predictor and its box-derived loss (spec §3.3), see sdconet/modeling/saliency.py.
    _C.MODEL.SDCONET.SALIENCY = CN()
    # Predict per-token saliency and train it with the soft-target focal loss.
    _C.MODEL.SDCONET.SALIENCY.ENABLED = False
    # Top-down mixing weights: "learnable" (Salience-DETR, U(-0.3, 0.3) init) or "fixed" (all 1.0,
    # not trained: the release's gradient-routing "alpha ablation", spec §3.3 item 4).
    _C.MODEL.SDCONET.SALIENCY.ALPHA = "learnable"
    # Weight of the saliency loss (spec §3.3: 2.0).
    _C.MODEL.SDCONET.SALIENCY.LOSS_WEIGHT = 2.0
    # Focal weighting of the soft-target BCE (spec §3.3: 0.25 / 2).
    _C.MODEL.SDCONET.SALIENCY.FOCAL_ALPHA = 0.25
    _C.MODEL.SDCONET.SALIENCY.FOCAL_GAMMA = 2.0
    # Per neck level (fine -> coarse), the (lo, hi] range of max(l, t, r, b) in HR pixels for which a
    # token inside a box is positive (spec §3.3; 100000 stands for infinity).
    _C.MODEL.SDCONET.SALIENCY.RANGES = ((-1, 64), (64, 128), (128, 256), (256, 100000))
    # Token selection (spec §3.4). Per neck level, the fraction of valid tokens the encoder keeps,
    # ranked by saliency (Salience-DETR: 0.4, 0.8, 1, 1; the release: all 1.0 = nothing dropped).
    _C.MODEL.SDCONET.SALIENCY.LEVEL_RATIOS = (0.4, 0.8, 1.0, 1.0)
    # Per encoder layer, the fraction of the kept tokens it updates (one value per ENC_LAYERS;
    # Salience-DETR: 1, .8, .6, .6, .4, .2; the release: all 1.0).
    _C.MODEL.SDCONET.SALIENCY.LAYER_RATIOS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    # Tokens that attend to each other in the pre-attention of every encoder layer (release: 100).
    _C.MODEL.SDCONET.SALIENCY.TOPK_PRE_ATTENTION = 100
    # Rank pre-attention tokens with the trained encoder class head (True, Salience-DETR) or with a
    # separate Linear that never receives a gradient (False, the release's bug, spec §9 item 3).
    _C.MODEL.SDCONET.SALIENCY.SHARED_SCORER = True

    # ---------------------------------------------------------------- serial baseline
    # SerialSRDetector (META_ARCHITECTURE): an SR network (own Swin + SR decoder) makes the SR
    # image, a second Swin + the same DINO detects on it (spec §8.1, DINO_SR_TS / SA_DINO_SR_TS).
    _C.MODEL.SDCONET.SERIAL = CN()
    # Detach the SR image before detection (True: DINO_SR_TS, SR and detection trained apart;
    # False: SA_DINO_SR_TS, detection gradients flow into the SR network).
    _C.MODEL.SDCONET.SERIAL.DETACH = True

    # ---------------------------------------------------------------- data
    # Input pixels are read as BGR like detectron2; mean/std below are ImageNet's, in BGR order.
    _C.MODEL.PIXEL_MEAN = [103.53, 116.28, 123.675]
    _C.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    # Random flips and 90-degree rotations at training time (remote-sensing standard).
    _C.INPUT.SDCONET = CN()
    # Probability of a horizontal flip.
    _C.INPUT.SDCONET.HFLIP_PROB = 0.5
    # Probability of a vertical flip.
    _C.INPUT.SDCONET.VFLIP_PROB = 0.0
    # Apply a random multiple of 90 degrees rotation (square tiles keep their size).
    _C.INPUT.SDCONET.ROT90 = False
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

    # ---------------------------------------------------------------- evaluation
    _C.TEST.SDCONET = CN()
    # COCO evaluation backend of SmallObjectCOCOEvaluator: "auto" (faster-coco-eval when
    # installed, else pycocotools), "faster" or "pycocotools". Its detection cap is
    # TEST.DETECTIONS_PER_IMAGE.
    _C.TEST.SDCONET.COCO_BACKEND = "auto"
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
    # LR multiplier of the backbone parameters (spec §7: 0.1).
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Clip the L2 norm of all gradients together (full model); <= 0 disables (spec §7: 0.1).
    _C.SOLVER.FULL_MODEL_CLIP_NORM = 0.1

    # Gradient routing between the SR and detection tasks (spec §5), GradientRoutingTrainer.
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


def check_sdconet_config(cfg):
    """Raise ``ValueError`` naming the key when a config value is impossible."""
    s = cfg.MODEL.SDCONET

    def fail(key, value, why):
        raise ValueError(f"Invalid config: {key}={value!r}: {why}")

    if s.DEGRADE.SCALE not in (1, 2, 4):
        fail("MODEL.SDCONET.DEGRADE.SCALE", s.DEGRADE.SCALE, "must be one of 1, 2, 4")
    if s.DEGRADE.MODE not in ("bicubic", "bilinear", "area"):
        fail("MODEL.SDCONET.DEGRADE.MODE", s.DEGRADE.MODE, "must be bicubic, bilinear or area")
    for key in ("BLUR_SIGMA", "NOISE_STD"):
        rng = tuple(s.DEGRADE.get(key))
        if len(rng) != 2 or rng[0] < 0 or rng[1] < rng[0]:
            fail(f"MODEL.SDCONET.DEGRADE.{key}", rng, "must be (low, high) with 0 <= low <= high")
    if s.NUM_CLASSES < 1:
        fail("MODEL.SDCONET.NUM_CLASSES", s.NUM_CLASSES, "must be >= 1")
    if s.NECK.NAME not in ("FPN", "ChannelMapper"):
        fail("MODEL.SDCONET.NECK.NAME", s.NECK.NAME, "must be FPN or ChannelMapper")
    if s.TRANSFORMER.NUM_QUERIES < 1:
        fail("MODEL.SDCONET.TRANSFORMER.NUM_QUERIES", s.TRANSFORMER.NUM_QUERIES, "must be >= 1")
    if s.TRANSFORMER.NUM_HEADS < 1 or s.NECK.OUT_CHANNELS % s.TRANSFORMER.NUM_HEADS:
        fail("MODEL.SDCONET.TRANSFORMER.NUM_HEADS", s.TRANSFORMER.NUM_HEADS,
             f"must divide MODEL.SDCONET.NECK.OUT_CHANNELS={s.NECK.OUT_CHANNELS}")
    if s.TRANSFORMER.DEFORM_IMPL not in ("auto", "grid_sample", "embedding_bag", "gather"):
        fail("MODEL.SDCONET.TRANSFORMER.DEFORM_IMPL", s.TRANSFORMER.DEFORM_IMPL,
             "must be auto, grid_sample, embedding_bag or gather")
    if not 0.0 <= s.DN.LABEL_NOISE <= 1.0:
        fail("MODEL.SDCONET.DN.LABEL_NOISE", s.DN.LABEL_NOISE, "must lie in [0, 1]")
    if s.SR.HEAD not in ("x2_bilinear", "full"):
        fail("MODEL.SDCONET.SR.HEAD", s.SR.HEAD, "must be x2_bilinear or full")
    if len(s.SR.DEPTHS) != 4 or min(s.SR.DEPTHS) < 1:
        fail("MODEL.SDCONET.SR.DEPTHS", tuple(s.SR.DEPTHS), "needs 4 stages of >= 1 block")
    if len(s.SR.NUM_HEADS) not in (0, 4):
        fail("MODEL.SDCONET.SR.NUM_HEADS", tuple(s.SR.NUM_HEADS), "needs 4 values (or none to derive)")
    if s.SR.LOSS_WEIGHT < 0:
        fail("MODEL.SDCONET.SR.LOSS_WEIGHT", s.SR.LOSS_WEIGHT, "must be >= 0")
    if s.SALIENCY.ALPHA not in ("learnable", "fixed"):
        fail("MODEL.SDCONET.SALIENCY.ALPHA", s.SALIENCY.ALPHA, "must be learnable or fixed")
    num_levels = len(s.SWIN.OUT_FEATURES) + s.NECK.NUM_EXTRA_LEVELS
    sal = s.SALIENCY
    checked = (("LEVEL_RATIOS", num_levels), ("LAYER_RATIOS", s.TRANSFORMER.ENC_LAYERS)) if sal.ENABLED else ()
    for key, expected in checked:
        ratios = tuple(sal.get(key))
        if len(ratios) != expected:
            fail(f"MODEL.SDCONET.SALIENCY.{key}", ratios, f"needs {expected} values "
                 f"({'neck levels' if key == 'LEVEL_RATIOS' else 'MODEL.SDCONET.TRANSFORMER.ENC_LAYERS'})")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            fail(f"MODEL.SDCONET.SALIENCY.{key}", ratios, "every ratio must lie in (0, 1]")
    if sal.ENABLED and len(sal.RANGES) != num_levels:
        fail("MODEL.SDCONET.SALIENCY.RANGES", tuple(sal.RANGES), f"needs one (lo, hi] range per neck level ({num_levels})")
    if sal.TOPK_PRE_ATTENTION < 1:
        fail("MODEL.SDCONET.SALIENCY.TOPK_PRE_ATTENTION", sal.TOPK_PRE_ATTENTION, "must be >= 1")
    if s.SR.ENABLED or cfg.MODEL.META_ARCHITECTURE == "SerialSRDetector":
        missing = [f for f in ("res3", "res4", "res5") if f not in s.SWIN.OUT_FEATURES]
        if missing:
            fail("MODEL.SDCONET.SWIN.OUT_FEATURES", tuple(s.SWIN.OUT_FEATURES),
                 f"the SR decoder needs skips from res3, res4 and res5 (missing {missing})")
    if cfg.TEST.SDCONET.COCO_BACKEND not in ("auto", "faster", "pycocotools"):
        fail("TEST.SDCONET.COCO_BACKEND", cfg.TEST.SDCONET.COCO_BACKEND, "must be auto, faster or pycocotools")
    if cfg.TEST.SDCONET.SR_QUALITY and not (s.SR.ENABLED or cfg.MODEL.META_ARCHITECTURE == "SerialSRDetector"):
        fail("TEST.SDCONET.SR_QUALITY", True, "needs an SR branch (MODEL.SDCONET.SR.ENABLED True)")
    if cfg.TEST.SDCONET.SR_QUALITY and not s.DEGRADE.TEST:
        fail("TEST.SDCONET.SR_QUALITY", True, "needs the HR image as reference, but MODEL.SDCONET.DEGRADE.TEST is "
             "False (test images are real low-resolution input)")
    test_amp = cfg.TEST.SDCONET.AMP
    if test_amp.DTYPE not in ("bfloat16", "float16"):
        fail("TEST.SDCONET.AMP.DTYPE", test_amp.DTYPE, "must be bfloat16 or float16")
    if test_amp.ENABLED and test_amp.DTYPE == "float16" and not cfg.MODEL.DEVICE.startswith("cuda"):
        fail("TEST.SDCONET.AMP.DTYPE", test_amp.DTYPE, f"float16 needs CUDA (MODEL.DEVICE is "
             f"{cfg.MODEL.DEVICE!r}); use bfloat16 on CPU")
    gr = cfg.SOLVER.GRADIENT_ROUTING
    if gr.MODE not in ("sum", "project", "stop"):
        fail("SOLVER.GRADIENT_ROUTING.MODE", gr.MODE, "must be sum, project or stop")
    if gr.PROJECTION not in ("per_tensor", "global"):
        fail("SOLVER.GRADIENT_ROUTING.PROJECTION", gr.PROJECTION, "must be per_tensor or global")
    if not 0 <= gr.START_ITER:
        fail("SOLVER.GRADIENT_ROUTING.START_ITER", gr.START_ITER, "must be >= 0")
    if cfg.SOLVER.AMP.DTYPE not in ("bfloat16", "float16"):
        fail("SOLVER.AMP.DTYPE", cfg.SOLVER.AMP.DTYPE, "must be bfloat16 or float16")
    if not 0.0 < cfg.SOLVER.EMA.DECAY < 1.0:
        fail("SOLVER.EMA.DECAY", cfg.SOLVER.EMA.DECAY, "must lie in (0, 1)")
    if cfg.SOLVER.OPTIMIZER not in ("ADAMW", "SGD"):
        fail("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, "must be ADAMW or SGD")
    for key in ("HFLIP_PROB", "VFLIP_PROB"):
        p = cfg.INPUT.SDCONET.get(key)
        if not 0.0 <= p <= 1.0:
            fail(f"INPUT.SDCONET.{key}", p, "is a probability and must lie in [0, 1]")
    inp = cfg.INPUT.SDCONET
    if len(inp.BANDS) not in (0, 1, 3) or any(not isinstance(b, int) or b < 1 for b in inp.BANDS):
        fail("INPUT.SDCONET.BANDS", tuple(inp.BANDS), "needs 3 band numbers (R, G, B) or 1 (gray), each >= 1 "
             "(bands count from 1), or () for the first three")
    if inp.SCALING not in ("percentile", "max"):
        fail("INPUT.SDCONET.SCALING", inp.SCALING, "must be percentile or max")
    pct = tuple(inp.PERCENTILES)
    if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
        fail("INPUT.SDCONET.PERCENTILES", pct, "must be (low, high) with 0 <= low < high <= 100")
    if inp.MAX_VALUE < 0:
        fail("INPUT.SDCONET.MAX_VALUE", inp.MAX_VALUE, "must be >= 0 (0 = the data type's maximum)")
    solver = cfg.SOLVER
    if not solver.BASE_LR >= 0:  # also NaN
        fail("SOLVER.BASE_LR", solver.BASE_LR, "must be >= 0")
    for key in ("MAX_ITER", "IMS_PER_BATCH", "CHECKPOINT_PERIOD"):
        if solver.get(key) < 1:
            fail(f"SOLVER.{key}", solver.get(key), "must be >= 1")
    return cfg
