#!/usr/bin/env python
"""NWPU VHR-10 (original release or COCO re-release) -> NWPU_VHR10_Split tiles + COCO json.

The release has no official split: source images are split with a seeded shuffle
(--test-fraction, --seed) before tiling, so no scene lands in both splits.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("sdconet") is None:  # a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "SDCoNet"))

from sdconet.data.formats.nwpu import load_nwpu_sources
from sdconet.data.formats.tiling import (
    add_tiling_arguments, check_sources_exist, seeded_split, write_tiled_split,
)
from sdconet.data.metadata import NWPU_VHR10_CLASSES

OUTPUT_NAME = "NWPU_VHR10_Split"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiling_arguments(parser)
    parser.add_argument("--test-fraction", type=float, default=0.3,
                        help="fraction of source images put in the test split (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    parser.add_argument("--coco-json", default=None,
                        help="COCO re-release: its json (default: <src>/annotations.json when there is no "
                             "'ground truth/' folder)")
    parser.add_argument("--image-dir", default=None,
                        help="COCO re-release: folder of the images (default: <src>/positive image set)")
    parser.add_argument("--no-negatives", action="store_true",
                        help="leave out 'negative image set/' (images without objects)")
    return parser.parse_args(argv)


def _resolve(path, src: Path):
    """A user path as given, else relative to --src."""
    if path is None:
        return None
    path = Path(path)
    return path if path.exists() or path.is_absolute() else src / path


def main(argv=None):
    args = parse_args(argv)
    src = Path(args.src)
    sources = load_nwpu_sources(src, _resolve(args.coco_json, src), _resolve(args.image_dir, src),
                                include_negatives=not args.no_negatives)
    check_sources_exist(sources)
    train_names, test_names = seeded_split([s.stem for s in sources], args.test_fraction, args.seed)
    by_name = {s.stem: s for s in sources}
    for split, names in (("train", train_names), ("test", test_names)):
        write_tiled_split([by_name[n] for n in names], Path(args.out) / OUTPUT_NAME / split, split,
                          NWPU_VHR10_CLASSES, args.tile, args.overlap, args.min_visible,
                          args.skip_empty, args.overwrite)


if __name__ == "__main__":
    main()
