#!/usr/bin/env python
"""HRSSD / HRRSD (Pascal-VOC layout, OPT2017/) -> HRSSD_Split tiles + COCO json.

Uses ImageSets/Main/{trainval or train+val, test}.txt when present; otherwise a seeded
split of the annotated images (--test-fraction, --seed).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("sdconet") is None:  # a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "SDCoNet"))

from sdconet.data.formats.tiling import (
    add_tiling_arguments, check_sources_exist, seeded_split, write_tiled_split,
)
from sdconet.data.formats.voc import find_voc_root, load_voc_sources, official_splits
from sdconet.data.metadata import HRSSD_CLASSES

OUTPUT_NAME = "HRSSD_Split"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiling_arguments(parser)
    parser.add_argument("--test-fraction", type=float, default=0.3,
                        help="test fraction of the seeded split, used only without ImageSets/Main (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    voc_root = find_voc_root(Path(args.src))
    # Parse everything first so a bad annotation fails before any tile is written.
    splits = official_splits(voc_root)
    if splits is not None:
        both = set(splits["train"]) & set(splits["test"])
        if both:
            raise ValueError(f"{len(both)} images are in both train and test, e.g. {sorted(both)[0]}")
        sources = {split: load_voc_sources(voc_root, HRSSD_CLASSES, ids) for split, ids in splits.items()}
    else:
        print(f"no ImageSets/Main split files in {voc_root}: seeded split "
              f"(seed {args.seed}, test fraction {args.test_fraction})")
        by_id = {s.stem: s for s in load_voc_sources(voc_root, HRSSD_CLASSES)}
        train_ids, test_ids = seeded_split(by_id, args.test_fraction, args.seed)
        sources = dict(train=[by_id[i] for i in train_ids], test=[by_id[i] for i in test_ids])
    check_sources_exist(s for split_sources in sources.values() for s in split_sources)
    for split, split_sources in sources.items():
        write_tiled_split(split_sources, Path(args.out) / OUTPUT_NAME / split, split, HRSSD_CLASSES,
                          args.tile, args.overlap, args.min_visible, args.skip_empty, args.overwrite)


if __name__ == "__main__":
    main()
