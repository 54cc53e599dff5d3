"""The machine a measurement ran on, and the header the measuring tools print above their figures."""
import os
import platform
import resource
import sys
from typing import Dict, List

import torch


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark in MiB (ru_maxrss counts KiB on Linux, bytes
    on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def machine_info(device: str) -> Dict:
    """CPU, cores, platform, software versions, the GPU on CUDA, and the load average: other work
    on the machine inflates latencies, so it is recorded before the run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    try:
        import detectron2
        import fvcore
        info["detectron2"] = detectron2.__version__
        info["fvcore"] = getattr(fvcore, "__version__", "?")
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def header_lines(result: Dict) -> List[str]:
    """Command, machine, software, config and input of a single-config report (a block meant to be
    pasted into a benchmark page as is)."""
    m, hr, lr = result["machine"], result["input_size_hr"], result["input_size_model"]
    return [
        f"command: {result['command']}",
        f"machine: {m['cpu']} ({m['cpu_cores']} cores), {m['platform']}"
        + (f", load average {m['load_average_1min']} at start" if "load_average_1min" in m else ""),
        f"software: python {m['python']}, torch {m['torch']}, detectron2 {m.get('detectron2', '?')}, "
        f"fvcore {m.get('fvcore', '?')}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"config: {result['config_file']}" + (f"  opts: {' '.join(result['opts'])}" if result["opts"] else ""),
        f"input: HR {hr[0]}x{hr[1]} -> model input (after x{result['degrade_scale']} degradation inside "
        f"the model) {lr[0]}x{lr[1]}, batch 1, eval mode, no_grad, device {result['device']}",
    ]


def comparison_lines(result: Dict) -> List[str]:
    """The serial-baseline and token-selection blocks of a single-config report, with the figures
    the tool measured: FLOPs (tools/analyze_model.py), latency (tools/benchmark.py) or both."""
    lines = []
    serial = result.get("serial")
    if serial:
        figures, ratios = [], []
        if "gflops" in serial:
            figures.append(f"inference params {serial['params_inference'] / 1e6:.2f} M, GFLOPs {serial['gflops']:.2f}")
            ratios.append(f"GFLOPs x{serial['gflops_ratio']:.2f}")
        if "latency_median_ms" in serial:
            figures.append(f"latency median {serial['latency_median_ms']:.1f} ms")
            ratios.append(f"latency x{serial['latency_ratio']:.2f}")
        lines += ["", f"serial baseline: {serial['config_file']}", "  " + ", ".join(figures),
                  "  serial / this config: " + ", ".join(ratios)]
    sel = result.get("selection_ablation")
    if sel:
        a, b = sel["selected"], sel["all_tokens"]
        runs = f", {sel['iters']} alternating runs each" if "iters" in sel else ""
        lines += ["", f"token selection (this config's ratios) vs all ratios 1.0{runs}:"]
        whole = []
        if "encoder_gflops" in a:
            lines.append(f"  encoder GFLOPs {a['encoder_gflops']:.3f} vs {b['encoder_gflops']:.3f} "
                         f"(x{sel['encoder_gflops_ratio']:.2f})")
            whole.append(f"GFLOPs {a['total_gflops']:.2f} vs {b['total_gflops']:.2f}")
        if "encoder_median_ms" in a:
            lines.append(f"  encoder latency median {a['encoder_median_ms']:.1f} ms vs {b['encoder_median_ms']:.1f} ms "
                         f"(x{sel['encoder_latency_ratio']:.2f})")
            whole.append(f"latency median {a['median_ms']:.1f} ms vs {b['median_ms']:.1f} ms "
                         f"(x{sel['latency_ratio']:.2f})")
        lines.append("  whole model: " + ", ".join(whole))
    return lines
