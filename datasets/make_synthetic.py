#!/usr/bin/env python
"""Generate Synthetic_RS, SDCoNet's built-in small-object remote-sensing dataset (no download).

Writes <out>/Synthetic_RS/{train,test}/images/<split>_<index>.png and
<out>/Synthetic_RS/{train,test}/annotations/instances_<split>.json (COCO), then prints the
number of images, objects per class and the object-size histogram of each split.
The same --seed always gives the same bytes.

A second run with the same arguments finds the set complete and does nothing (so `make demo`
can run again); a run that would replace a set made with other arguments is refused unless
--overwrite is given.
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

if importlib.util.find_spec("sdconet") is None:  # a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "SDCoNet"))

from sdconet.data.synthetic import (DATASET_DIRNAME, format_summary, generate_synthetic_dataset, summarize_coco,
                                    synthetic_split_paths)

MIN_SIZE = 64  # the generator's smallest tile


def at_least(minimum: int):
    """argparse type: a whole number >= ``minimum`` (argparse names the flag in its error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("SDCONET_DATASETS", "./datasets"),
                        help="datasets root (default: $SDCONET_DATASETS or ./datasets)")
    parser.add_argument("--num-train", type=at_least(1), default=400, help="training tiles (default 400)")
    parser.add_argument("--num-test", type=at_least(1), default=100, help="test tiles (default 100)")
    parser.add_argument("--size", type=at_least(MIN_SIZE), default=256,
                        help=f"side of the square HR tiles in pixels, at least {MIN_SIZE} (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed; train and test derive their own (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing Synthetic_RS set made with other arguments")
    return parser.parse_args(argv)


def existing_set(out, args):
    """What <out>/Synthetic_RS holds: ("complete", {split: coco}) when it is exactly the set ``args``
    make, ("other", reason) when it is a set made otherwise, ("none", None) when there is no finished
    set (no folder, or only tiles of an interrupted run, whose json files are written last)."""
    wanted = {"train": args.num_train, "test": args.num_test}
    cocos, complete = {}, True
    for split, count in wanted.items():
        image_dir, json_path = synthetic_split_paths(out, split)
        if not json_path.is_file():
            complete = False
            continue
        try:
            coco = json.loads(json_path.read_bytes())
            info = coco.get("info", {})
            made = (len(coco["images"]), info.get("tile_size"), info.get("seed"))
            files = [image_dir / image["file_name"] for image in coco["images"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return "other", f"{json_path} is not a json this script wrote ({type(e).__name__}: {e})"
        if made != (count, args.size, args.seed):
            return "other", (f"{json_path} holds {made[0]} tiles of size {made[1]}, seed {made[2]} "
                             f"(asked: {count} tiles of size {args.size}, seed {args.seed})")
        cocos[split] = coco
        complete &= all(path.is_file() for path in files)
    return ("complete", cocos) if complete else ("none", None)


def main(argv=None):
    args = parse_args(argv)
    state, found = existing_set(args.out, args)
    if state == "complete":
        print(f"{Path(args.out) / DATASET_DIRNAME} already holds this set: nothing to do "
              f"(--overwrite regenerates it)")
        summary = {split: summarize_coco(coco, *synthetic_split_paths(args.out, split)) for split, coco in found.items()}
    else:
        if state == "other" and not args.overwrite:
            raise SystemExit(f"error: {Path(args.out) / DATASET_DIRNAME} already holds another Synthetic_RS set: "
                             f"{found}. Pass --overwrite to replace it, or --out another datasets root.")
        for split in ("train", "test"):  # the json files mark a finished split: gone until it is rewritten
            synthetic_split_paths(args.out, split)[1].unlink(missing_ok=True)
        summary = generate_synthetic_dataset(args.out, args.num_train, args.num_test, args.size, args.seed)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
