#!/usr/bin/env python
"""Generate Synthetic_RS, SDCoNet's built-in small-object remote-sensing dataset (no download).

Writes <out>/Synthetic_RS/{train,test}/images/<split>_<index>.png and
<out>/Synthetic_RS/{train,test}/annotations/instances_<split>.json (COCO), then prints the
number of images, objects per class and the object-size histogram of each split.
The same --seed always gives the same bytes.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("sdconet") is None:  # a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "SDCoNet"))

from sdconet.data.synthetic import format_summary, generate_synthetic_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("SDCONET_DATASETS", "./datasets"),
                        help="datasets root (default: $SDCONET_DATASETS or ./datasets)")
    parser.add_argument("--num-train", type=int, default=400, help="training tiles (default 400)")
    parser.add_argument("--num-test", type=int, default=100, help="test tiles (default 100)")
    parser.add_argument("--size", type=int, default=256, help="side of the square HR tiles in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed; train and test derive their own (default 0)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    summary = generate_synthetic_dataset(args.out, args.num_train, args.num_test, args.size, args.seed)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
