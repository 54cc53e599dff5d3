"""Multi-scale deformable attention (Deformable-DETR) in plain PyTorch.

No compiled kernel: the same code runs on CPU and GPU, which keeps the project installable
anywhere. Three exact formulations of the sampling are available (``impl``):

* ``"grid_sample"``: one ``F.grid_sample`` per level. Known to every tracer and exporter
  (ONNX, fvcore's FLOP counter) and the fastest on GPUs.
* ``"embedding_bag"``: the bilinear corners of all samples as row indices into one table of
  zero-bordered levels, summed with ``F.embedding_bag``; its backward gathers each table row's
  gradient from the samples sorted by their 2x2 patch. One gather-and-sum kernel instead of a
  ``grid_sample`` per level, and a backward without atomic scatters: the faster formulation on
  CPU, slower than grid_sample on GPUs (``tools/benchmark_deform_attn.py`` measures them; the
  figures are in BENCHMARKS.md).
* ``"gather"``: the same corners, gathered and summed with ordinary autograd ops. Slow eagerly
  (it materialises every corner row) but a single fusable loop for ``torch.compile``.

``"auto"`` picks per call; see :func:`resolve_implementation`.
"""
import functools
import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]

IMPLEMENTATIONS = ("grid_sample", "embedding_bag", "gather")


def as_int_shapes(spatial_shapes: SpatialShapes):
    """(h, w) of every level as Python ints: one host transfer for a tensor, none for a list."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def check_implementation(impl: str) -> str:
    if impl != "auto" and impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown deformable attention impl {impl!r}; choose 'auto' or one of {IMPLEMENTATIONS}")
    return impl


def resolve_implementation(impl: str, device: torch.device) -> str:
    """The formulation ``impl`` stands for on ``device``.

    ``"auto"`` gives grid_sample when traced (ONNX export, fvcore's FLOP count: they know that op)
    and on GPUs (measured fastest there), gather inside ``torch.compile`` (inductor fuses it) and
    embedding_bag otherwise (measured fastest on CPU).
    """
    check_implementation(impl)
    if impl != "auto":
        return impl
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return "grid_sample"
    if torch.compiler.is_compiling():
        return "gather"
    return "embedding_bag" if device.type == "cpu" else "grid_sample"


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights, impl: str = "auto"):
    """Weighted sum of bilinear samples taken on every level of a flattened feature pyramid.

    Args:
        value: (B, S, H, Dh), the levels flattened row-major and concatenated, S = sum(h*w).
        spatial_shapes: (L, 2) LongTensor or list of (h, w).
        sampling_locations: (B, Q, H, L, P, 2), normalised (x, y); pixel centres lie at
            (i + 0.5) / w (``align_corners=False``); samples outside the map read zeros.
        attention_weights: (B, Q, H, L, P).
        impl: "auto" or one of :data:`IMPLEMENTATIONS`; all give the same result up to rounding.
    Returns:
        (B, Q, H * Dh).
    """
    shapes = as_int_shapes(spatial_shapes)
    num_levels = sampling_locations.shape[3]
    if len(shapes) != num_levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {num_levels} sampling levels")
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"spatial shapes {shapes} do not add up to {value.shape[1]} value tokens")
    impl = resolve_implementation(impl, value.device)
    if impl == "grid_sample":
        return _grid_sample_attention(value, shapes, sampling_locations, attention_weights)
    table, index, weights, blocks = _bilinear_corners(value, shapes, sampling_locations, attention_weights)
    if impl == "embedding_bag":
        sampled = _PatchWeightedSum.apply(table, index, weights, blocks)
    else:
        sampled = (table[index.flatten(1)] * weights.flatten(1)[..., None]).sum(1)
    batch, num_queries, num_heads = sampling_locations.shape[:3]
    return sampled.view(batch, num_queries, num_heads * value.shape[3])


def _grid_sample_attention(value, shapes, sampling_locations, attention_weights):
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1] and one image per (batch, head). Points go before
    # queries so that the sum over points runs over a middle dimension (vectorised over queries).
    grids = (2.0 * sampling_locations - 1.0).permute(0, 2, 3, 4, 1, 5)
    grids = grids.reshape(batch * num_heads, num_levels, num_points, num_queries, 2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(batch * num_heads, num_levels, 1, num_points, num_queries)
    output = None
    for level, (height, width) in enumerate(shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        # -> (B*H, Dh, P, Q); weighted sum over points -> (B*H, Dh, Q)
        sampled = F.grid_sample(level_value, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        contribution = (sampled * weights[:, level]).sum(2)
        output = contribution if output is None else output + contribution
    # (B*H, Dh, Q) -> (B, Q, H*Dh)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


# Zero border of every level in the corner table: one pixel before and two after on each axis,
# so that the 2x2 patch of any top-left pixel in [-1, w] x [-1, h] lies inside the bordered level.
_BORDER_BEFORE, _BORDER_AFTER = 1, 2


def _level_interiors(per_head: torch.Tensor, shapes, blocks, table: torch.Tensor):
    """Pairs (level values, inside of its bordered block in ``table``) as (B, H, h, w, Dh) views;
    ``per_head`` is (B, H, S, Dh), ``table`` (B, H, R, Dh)."""
    levels = per_head.split([h * w for h, w in shapes], dim=2)
    for level, (h, w), (first, rows, bordered_w) in zip(levels, shapes, blocks):
        block = table[:, :, first:first + rows].unflatten(2, (rows // bordered_w, bordered_w))
        inside = block[:, :, _BORDER_BEFORE:_BORDER_BEFORE + h, _BORDER_BEFORE:_BORDER_BEFORE + w]
        yield level.unflatten(2, (h, w)), inside


class _BorderedTable(torch.autograd.Function):
    """(B, S, H, Dh) values -> (B, H, R, Dh) table of zero-bordered levels (see ``blocks``).

    Each level is copied once, straight into the inside of its block, and the gradient is copied
    straight back: no transposed copy, padded copies and concatenation in between (and none of
    their backward copies).
    """

    @staticmethod
    def forward(ctx, value, shapes, blocks):
        ctx.shapes, ctx.blocks = shapes, blocks
        batch, _, num_heads, head_dim = value.shape
        table = value.new_zeros(batch, num_heads, blocks[-1][0] + blocks[-1][1], head_dim)
        for level, inside in _level_interiors(value.permute(0, 2, 1, 3), shapes, blocks, table):
            inside.copy_(level)
        return table

    @staticmethod
    def backward(ctx, grad_table):
        batch, num_heads, _, head_dim = grad_table.shape
        grad_value = grad_table.new_empty(batch, sum(h * w for h, w in ctx.shapes), num_heads, head_dim)
        for level, inside in _level_interiors(grad_value.permute(0, 2, 1, 3), ctx.shapes, ctx.blocks, grad_table):
            level.copy_(inside)
        return grad_value, None, None


def _bilinear_corners(value, shapes, sampling_locations, attention_weights):
    """Bilinear sampling as a sparse weighted sum of table rows.

    Returns:
        table: (B*H*R, Dh) the levels of every (batch, head) with a zero border, R rows per (batch, head).
        index: (B*Q*H, 4, L*P) table row of each corner; corner 0 is the patch's top-left pixel,
            then its right, lower and lower-right neighbours.
        weights: (B*Q*H, 4, L*P) bilinear weight x attention weight of each corner.
        blocks: (first row, rows, bordered width) of every level inside the R rows of a (batch, head).
    Coordinates beyond the border are clamped to it: such a sample only reads border zeros, as
    it reads zeros outside the map in grid_sample, with a zero gradient in both.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_groups, num_bags, num_samples = batch * num_heads, batch * num_queries * num_heads, num_levels * num_points
    device, dtype = value.device, sampling_locations.dtype
    blocks, first_row = [], 0
    for h, w in shapes:
        bordered_h, bordered_w = h + _BORDER_BEFORE + _BORDER_AFTER, w + _BORDER_BEFORE + _BORDER_AFTER
        blocks.append((first_row, bordered_h * bordered_w, bordered_w))
        first_row += bordered_h * bordered_w
    rows_per_group = first_row

    table = _BorderedTable.apply(value, shapes, blocks)

    def per_sample(values, dtype):  # one value per level -> (L*P,) matching the flattened (level, point) axis
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(num_points)

    widths, heights = per_sample([w for _, w in shapes], dtype), per_sample([h for h, _ in shapes], dtype)
    minus_one = torch.full_like(widths, -1.0)
    locations = sampling_locations.reshape(num_bags, num_samples, 2)
    # Pixel coordinates (pixel centres at integers), clamped to the border.
    x = torch.clamp(locations[..., 0] * widths - 0.5, minus_one, widths)
    y = torch.clamp(locations[..., 1] * heights - 0.5, minus_one, heights)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0

    bordered_widths = per_sample([b[2] for b in blocks], torch.long)
    # Table row of pixel (0, 0) of every level.
    origins = per_sample([b[0] + _BORDER_BEFORE * b[2] + _BORDER_BEFORE for b in blocks], torch.long)
    group_rows = (torch.arange(num_groups, device=device) * rows_per_group).view(batch, 1, num_heads, 1)
    top_left = (y0.long() * bordered_widths + x0.long() + origins).view(batch, num_queries, num_heads, num_samples)
    top_left = top_left + group_rows
    corner_offsets = torch.stack([torch.zeros_like(bordered_widths), torch.ones_like(bordered_widths),
                                  bordered_widths, bordered_widths + 1])
    index = top_left.view(num_bags, 1, num_samples) + corner_offsets

    weights_x = torch.stack([1 - fx, fx], dim=1)
    weights_y = torch.stack([1 - fy, fy], dim=1) * attention_weights.reshape(num_bags, 1, num_samples)
    weights = (weights_y[:, :, None] * weights_x[:, None]).flatten(1, 2)
    return table.view(num_groups * rows_per_group, head_dim), index, weights, blocks


class _PatchWeightedSum(torch.autograd.Function):
    """out[n] = sum_j weights[n, j] * table[index[n, j]] over the corners of :func:`_bilinear_corners`.

    The autograd of ``F.embedding_bag`` sorts all corner indices for the table gradient and takes
    one dot product at a time for the weight gradient; both dominate a training step on CPU. Here
    the table gradient sorts only the samples' top-left corners (a quarter of the indices) and
    gathers them with ``F.embedding_bag`` (:func:`_table_gradient`), and the weight gradient is
    one sampled matrix product.
    """

    @staticmethod
    def forward(ctx, table, index, weights, blocks):
        ctx.save_for_backward(table, index, weights)
        ctx.blocks = blocks
        return F.embedding_bag(index.flatten(1), table, per_sample_weights=weights.flatten(1), mode="sum")

    @staticmethod
    def backward(ctx, grad_output):
        table, index, weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = _table_gradient(grad_output, index, weights, ctx.blocks, table.shape[0])
        if ctx.needs_input_grad[2]:
            grad_weights = _weight_gradient(grad_output, table, index, weights)
        return grad_table, None, grad_weights, None


def _table_gradient(grad_output, index, weights, blocks, num_rows):
    """d out / d table: every corner row receives weight x output gradient of its bag.

    The scatter is turned into a gather: samples are sorted by their patch's top-left row, and
    ``F.embedding_bag`` sums, for every (corner, row), the output gradients of the samples whose
    patch starts there. The stable sort keeps the samples of a row in their original order, so
    the sums are deterministic.
    """
    num_samples = index.shape[2]
    head_dim = grad_output.shape[1]
    top_left = index[:, 0].flatten()
    # int32 keys: every row index fits, and half-width keys make a much cheaper sort than int64 ones.
    sorted_rows, order = torch.sort(top_left.to(torch.int32), stable=True)
    all_rows = torch.arange(num_rows, dtype=torch.int32, device=index.device)
    starts = torch.searchsorted(sorted_rows, all_rows)  # first sorted sample of every row
    bags = order // num_samples  # the grad_output row of every sorted sample
    # (4, N): the corner weights of the sorted samples, one contiguous row per corner.
    corner_weights = weights.transpose(0, 1).reshape(4, -1).gather(1, order.expand(4, -1))
    # Per corner, one bag per patch top-left row: (R, Dh) each.
    patches = [F.embedding_bag(bags, grad_output, starts, mode="sum", per_sample_weights=w) for w in corner_weights]
    # Move the right, lower and lower-right parts of every patch onto their own rows. The shifts
    # stay inside a level: no top-left corner lies on a level's last border row or column.
    rows_per_group = blocks[-1][0] + blocks[-1][1]
    grad_table, *others = (p.view(num_rows // rows_per_group, rows_per_group, head_dim) for p in patches)
    for first_row, rows, width in blocks:
        level = grad_table[:, first_row:first_row + rows]
        for patch, shift in zip(others, (1, width, width + 1)):
            level[:, shift:] += patch[:, first_row:first_row + rows - shift]
    return grad_table.view(num_rows, head_dim)


def _weight_gradient(grad_output, table, index, weights):
    """d out / d weights: the dot product of each bag's output gradient with each of its corner
    rows, i.e. (grad_output @ table.T) read at the corners (a sampled dense-dense product)."""
    corners = index.flatten(1)
    num_bags, per_bag = corners.shape
    row_starts = torch.arange(0, num_bags * per_bag + 1, per_bag, device=index.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        # Only the pattern matters (beta=0); the values are any finite numbers of the right dtype.
        pattern = torch.sparse_csr_tensor(row_starts, corners.flatten(), weights.flatten(),
                                          (num_bags, table.shape[0]), check_invariants=False)
        products = torch.sparse.sampled_addmm(pattern, grad_output, table.t(), beta=0.0)
    return products.values().view(weights.shape)


class MSDeformAttn(nn.Module):
    """Deformable attention: each query samples ``num_points`` locations per head and level
    around its reference point and mixes them with learned, query-dependent weights."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 impl: str = "auto", compile: bool = False):
        """``impl``: formulation of the sampling (see :func:`multi_scale_deformable_attention`).
        ``compile``: run the sampling through ``torch.compile`` (built on first use, eager with one
        warning if that fails); stored as ``compile_sampling`` (``compile`` is a Module method)."""
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.impl = check_implementation(impl)
        self.compile_sampling = compile
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._level_sizes = (None, None)  # (key, tensor): see level_sizes
        self.reset_parameters()

    def reset_parameters(self):
        """Start with uniform weights over points that fan out radially, one direction per head,
        farther for higher point indices (Deformable-DETR initialisation)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        # Scale so the larger component is 1: the first point lands on a neighbouring pixel.
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        point_distance = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * point_distance[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def level_sizes(self, shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
        """(L, 2) float32 (w, h) of each level on ``device``, kept for the next call with the same
        shapes: made from host numbers it is a host-to-device copy, which syncs on CUDA, and every
        layer of a forward asks for the same one."""
        # An inference-mode tensor cannot be saved for a later backward, so that mode is in the key.
        key = (tuple(shapes), torch.device(device), torch.is_inference_mode_enabled())
        if self._level_sizes[0] != key:
            sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)
            self._level_sizes = (key, sizes)
        return self._level_sizes[1]

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C), positional embedding already added.
            reference_points: (B, Q, L, 2) normalised (x, y) points, or (B, Q, L, 4) boxes
                (cx, cy, w, h); with boxes the offsets are scaled by the box size.
            value: (B, S, C) flattened multi-scale features.
            spatial_shapes: (L, 2) LongTensor or list of (h, w).
            value_padding_mask: (B, S) bool, True at padding (those values read as zero).
        Returns:
            (B, Q, C).
        """
        shapes = as_int_shapes(spatial_shapes)
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != levels:
            raise ValueError(f"MSDeformAttn built for {levels} levels, got {len(shapes)} spatial shapes")

        projected_value = self.value_proj(value)
        # On CPU, reading the mask is free and most batches have no padding: skip the copy then
        # (on CUDA the read would wait for the GPU, and a traced graph must keep the fill).
        skippable = value.device.type == "cpu" and not torch.jit.is_tracing()
        if value_padding_mask is not None and (not skippable or value_padding_mask.any()):
            projected_value = projected_value.masked_fill(value_padding_mask[..., None], 0.0)
        projected_value = projected_value.view(batch, value.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weight_logits = self.attention_weights(query).view(batch, num_queries, heads, levels * points)

        # Sampling positions must stay precise (a bf16 coordinate is off by pixels on large maps),
        # so locations, softmax and sampling run in fp32 whatever autocast says.
        out_dtype = projected_value.dtype
        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets = offsets.float()
            reference_points = reference_points.float()
            weights = weight_logits.float().softmax(-1).view(batch, num_queries, heads, levels, points)
            if reference_points.shape[-1] == 2:
                # Offsets are in pixels of each level: divide by (w, h).
                level_sizes = self.level_sizes(shapes, query.device)
                locations = reference_points[:, :, None, :, None, :] + offsets / level_sizes[None, None, None, :, None, :]
            elif reference_points.shape[-1] == 4:
                # Offsets are fractions of the half box size, spread over the points.
                centres = reference_points[:, :, None, :, None, :2]
                half_sizes = reference_points[:, :, None, :, None, 2:] * 0.5
                locations = centres + offsets / points * half_sizes
            else:
                raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
            sampled = self._sample(projected_value.float(), shapes, locations, weights)
        return self.output_proj(sampled.to(out_dtype))

    def _sample(self, value, shapes, locations, weights):
        """:func:`multi_scale_deformable_attention` with this module's ``impl``, compiled if asked."""
        if self.compile_sampling:
            compiled = _compiled_attention(self.impl)
            if compiled is not None:
                try:
                    return compiled(value, shapes, locations, weights)
                except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                    _COMPILED[self.impl] = None
                    warnings.warn(f"torch.compile of deformable attention failed, running it eagerly: {error!r}")
        return multi_scale_deformable_attention(value, shapes, locations, weights, impl=self.impl)


# impl -> the compiled sampling function, shared by all modules; None once compiling it failed.
_COMPILED = {}


def _compiled_attention(impl: str):
    if impl not in _COMPILED:
        _COMPILED[impl] = torch.compile(functools.partial(multi_scale_deformable_attention, impl=impl), dynamic=True)
    return _COMPILED[impl]
