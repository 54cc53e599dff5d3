"""``SerialSRDetector``: the serial SR-then-detect baseline SDCoNet is compared against
(docs/method.md, Serial baseline).

An SR network (its own Swin encoder + the SR decoder) turns the LR input into an HR-sized image;
a second Swin + the same neck and DINO transformer detect on that image. Unlike SDCoNet, the SR
network runs at inference too, and the detector works at HR resolution (4x the tokens at x2),
which is where the paper's "5x fewer FLOPs" comparison comes from.

``MODEL.SDCONET.SERIAL.DETACH`` picks between the two released variants, which disagree on this:
True = DINO_SR_TS (SR image detached: SR and detection trained apart), False = SA_DINO_SR_TS
(detection gradients reach the SR network).
"""
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone

from ..layers.onednn_linear import use_onednn_linear
from .meta_arch import SDCoNet
from .sr_decoder import build_sr_decoder


@META_ARCH_REGISTRY.register()
class SerialSRDetector(SDCoNet):
    """SR network on the LR input, then a separate Swin + DINO on the SR image.

    The detector needs the SR image, so the SR network always runs and training always returns
    ``loss_sr``; ``outputs(sr=True)`` only adds the "sr" / "lr" images to eval outputs."""

    @configurable
    def __init__(self, *, sr_backbone, detach: bool = True, **kwargs):
        super().__init__(**kwargs)
        if self.sr_decoder is None:
            raise ValueError("SerialSRDetector needs an SR decoder")
        self.sr_backbone = sr_backbone
        self.detach = detach

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        sr_backbone = build_backbone(cfg)
        args["sr_backbone"] = sr_backbone
        args["sr_decoder"] = build_sr_decoder(cfg, sr_backbone.output_shape()["patch_embed"].channels)
        if cfg.MODEL.SDCONET.ONEDNN_LINEAR:
            use_onednn_linear(sr_backbone)
            use_onednn_linear(args["sr_decoder"])
        args["detach"] = cfg.MODEL.SDCONET.SERIAL.DETACH
        return args

    def forward(self, batched_inputs):
        with self.eval_autocast():
            images = self.preprocess_image(batched_inputs)
            lr, lr_sizes = self.degrade(images)
            sr = self.sr_decoder(self.sr_backbone(lr), lr, images.tensor.shape[-2:])
            detector_input = sr.detach() if self.detach else sr
            _, levels, masks = self.extract_features(detector_input, images.image_sizes)

            if self.training:
                return self.training_losses(levels, masks, batched_inputs, images, sr)

            outputs = self.transformer(levels, masks, None)
        return self.postprocess(outputs, batched_inputs, images, lr, lr_sizes, sr if self._outputs["sr"] else None)
