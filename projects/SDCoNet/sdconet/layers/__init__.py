"""Config-free building blocks: deformable attention, fast CPU linear and conv layers, sine position encodings."""
from .matmul_conv import MatmulConv2d, MatmulConvTranspose2x2
from .ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from .onednn_linear import OneDNNLinear, use_onednn_linear
from .position_encoding import PositionEmbeddingSine, box_sine_embedding

__all__ = ["MatmulConv2d", "MatmulConvTranspose2x2", "MSDeformAttn", "multi_scale_deformable_attention",
           "OneDNNLinear", "use_onednn_linear", "PositionEmbeddingSine", "box_sine_embedding"]
