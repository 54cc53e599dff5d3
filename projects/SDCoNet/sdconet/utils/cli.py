"""The command line the measuring tools share (tools/analyze_model.py, benchmark.py, benchmark_page.py)."""
import argparse
import json
import os
import shlex
import sys
from typing import Callable, Dict, Optional, Sequence

import torch


def measuring_parser(description: str, timing: bool) -> argparse.ArgumentParser:
    """The input image and device flags; with ``timing`` also the repetitions and threads."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"),
                        help="HR image size given to the model (it degrades it itself)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input images")
    if timing:
        parser.add_argument("--warmup", type=int, default=3, help="untimed eval forwards first")
        parser.add_argument("--iters", type=int, default=10, help="timed eval forwards")
        parser.add_argument("--train-iters", type=int, default=3, help="timed training steps")
        parser.add_argument("--train-warmup", type=int, default=4,
                            help="untimed training steps first: a process's first 2-3 steps grow its heap (page "
                                 "faults), which a long training run pays only once")
        parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


def add_config_args(parser: argparse.ArgumentParser, figure: str) -> argparse.ArgumentParser:
    """The flags of a tool that reports one config, and compares ``figure`` with two other models."""
    parser.add_argument("--config-file", metavar="FILE", required=True)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    parser.add_argument("--serial-config", metavar="FILE",
                        help=f"also measure this serial baseline and print its {figure} / this config's")
    parser.add_argument("--selection-ablation", action="store_true",
                        help=f"also compare encoder {figure} with all token-selection ratios at 1.0")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], tool: str):
    """Parsed arguments, with ``command``: the command line as the report prints it."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    args.command = f"python tools/{tool} " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return args


def write_json(path: Optional[str], result: Dict):
    """Write the figures as JSON to ``path`` (if given), creating its folder."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def report(args, result: Dict, machine: Dict, format_report: Callable[[Dict], str]) -> Dict:
    """Complete ``result`` with the command line and the machine, print it, write it as JSON
    (``--json``) and return it."""
    result.update(command=args.command, machine=machine)
    print(format_report(result))
    write_json(args.json, result)
    return result
