"""Wall times of a detector: eval latency (whole model or one submodule), training step and its
peak memory, and the best fp32 matrix-product throughput of the device (the floor's yardstick).

Inputs are random and already on the device, so the times exclude the host-to-device copy. This
module imports nothing else from ``sdconet``: tools/benchmark_page.py also measures an older
commit's package with it.
"""
import statistics
import time
from typing import Dict, List, Optional

import torch
from torch import nn


def random_inputs(height: int, width: int, device: str = "cpu", seed: int = 0) -> List[Dict]:
    """detectron2 batched inputs holding one random uint8 BGR HR image, already on ``device`` so
    the latency excludes the host-to-device copy."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return [{"image": image.to(device), "height": height, "width": width}]


def synthetic_training_batch(height: int, width: int, device: str, batch: int = 2, seed: int = 0) -> List[Dict]:
    """``batch`` random HR images, each with a few boxes of small-object size (8-48 px)."""
    from detectron2.structures import Boxes, Instances
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        n = 8
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([width - 48.0, height - 48.0])
        wh = 8 + torch.rand(n, 2, generator=generator) * 40
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=generator)
        items.append({"image": image.to(device), "instances": inst.to(device), "height": height, "width": width})
    return items


def _synchronize(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


class ModuleTimer:
    """Wall time spent inside one submodule's forward, through forward hooks (synchronising CUDA)."""

    def __init__(self, module: nn.Module):
        self.times: List[float] = []
        self._start = 0.0
        cuda = next(module.parameters()).device.type == "cuda"

        def before(*_):
            _synchronize(cuda)
            self._start = time.perf_counter()

        def after(*_):
            _synchronize(cuda)
            self.times.append((time.perf_counter() - self._start) * 1000.0)

        self._handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def measure_latency(model: nn.Module, inputs, warmup: int = 3, iters: int = 10,
                    submodule: Optional[str] = None) -> Dict:
    """Wall time of ``iters`` eval forwards after ``warmup`` untimed ones, in ms; with
    ``submodule`` (a dotted name), also the median time spent inside it (``submodule_median_ms``)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    cuda = next(model.parameters()).device.type == "cuda"
    was_training = model.training
    model.eval()
    timer = ModuleTimer(model.get_submodule(submodule)) if submodule else None
    times = []
    try:
        with torch.no_grad():
            for step in range(warmup + iters):
                _synchronize(cuda)
                start = time.perf_counter()
                model(inputs)
                _synchronize(cuda)
                if step >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        if timer:
            timer.remove()
        model.train(was_training)
    result = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
              "min_ms": min(times), "max_ms": max(times), "warmup": warmup, "iters": iters,
              "threads": torch.get_num_threads()}
    if timer:
        result["submodule"] = submodule
        result["submodule_median_ms"] = statistics.median(timer.times[-iters:])
    return result


def measure_training_step(model: nn.Module, batch: List[Dict], warmup: int = 1, iters: int = 3,
                          optimizer: Optional[torch.optim.Optimizer] = None,
                          autocast_dtype: Optional[torch.dtype] = None) -> Dict:
    """Median wall time of forward + backward + optimizer step in training mode, in ms, and the
    peak memory: CUDA allocator peak on GPU, the process's peak RSS (everything so far) on CPU.

    ``optimizer``: the one training uses (the tools pass ``Trainer.build_optimizer``'s: full-model
    gradient clipping + AdamW); None = a plain AdamW. ``autocast_dtype``: run the forward under
    autocast, as the trainer does with SOLVER.AMP.ENABLED.
    """
    device_type = next(model.parameters()).device.type
    cuda = device_type == "cuda"
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + iters):
        _synchronize(cuda)
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        _synchronize(cuda)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    model.eval()
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_ms": statistics.median(times), "iters": iters, "warmup": warmup, "batch": len(batch),
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": "CUDA allocator peak" if cuda else "process peak RSS"}


def gemm_peaks(device: str, size: int = 2048, repeats: int = 5) -> Dict[str, float]:
    """The best fp32 matrix-product throughput seen on ``device``, in G multiply-adds per second,
    per library: on CPU both of torch's (MKL behind ``@``, oneDNN behind ``torch.ops.mkldnn``,
    which ``MODEL.SDCONET.ONEDNN_LINEAR`` uses), so a user sees which one this machine favours."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    products = {"cublas" if device == "cuda" else "mkl": lambda: a @ b}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        products["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    peaks = {}
    for name, product in products.items():
        best = float("inf")
        for _ in range(repeats + 1):
            _synchronize(device == "cuda")
            start = time.perf_counter()
            product()
            _synchronize(device == "cuda")
            best = min(best, time.perf_counter() - start)
        peaks[name] = size**3 / best / 1e9
    return peaks
