#!/usr/bin/env python
"""DOTA-v1.5 (train/ and val/, each with images/ and labelTxt/) -> DOTAv1.5_Split tiles + COCO json.

DOTA's test labels are not public, so its val set is the test split (as the authors do).
Polygons become horizontal boxes (min/max of the four corners).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("sdconet") is None:  # a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "SDCoNet"))

from sdconet.data.formats.dota import load_dota_split
from sdconet.data.formats.tiling import add_tiling_arguments, check_sources_exist, write_tiled_split
from sdconet.data.metadata import DOTA15_CLASSES

OUTPUT_NAME = "DOTAv1.5_Split"
SPLITS = (("train", "train"), ("val", "test"))  # raw folder -> output split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiling_arguments(parser)
    parser.add_argument("--skip-difficult", action="store_true",
                        help="drop objects marked difficult=1 (default: keep them)")
    parser.add_argument("--label-dir", default="labelTxt",
                        help="name of the label folder inside train/ and val/ (default labelTxt)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    src = Path(args.src)
    # Parse everything first so a bad label file fails before any tile is written.
    sources = {split: load_dota_split(src / raw, DOTA15_CLASSES, args.skip_difficult, args.label_dir)
               for raw, split in SPLITS}
    check_sources_exist(s for split_sources in sources.values() for s in split_sources)
    for split, split_sources in sources.items():
        write_tiled_split(split_sources, Path(args.out) / OUTPUT_NAME / split, split, DOTA15_CLASSES,
                          args.tile, args.overlap, args.min_visible, args.skip_empty, args.overwrite)


if __name__ == "__main__":
    main()
