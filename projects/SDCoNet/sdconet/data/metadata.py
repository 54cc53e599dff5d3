"""Class lists of the datasets SDCoNet knows.

Category ids in every COCO json we write are 1..N in the order of these lists, so
detectron2's ``load_coco_json`` maps them to the contiguous ids 0..N-1 of ``thing_classes``.
"""

NWPU_VHR10_CLASSES = (
    "airplane", "ship", "storage tank", "baseball diamond", "tennis court",
    "basketball court", "ground track field", "harbor", "bridge", "vehicle",
)

DOTA15_CLASSES = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court",
    "basketball-court", "ground-track-field", "harbor", "bridge", "large-vehicle",
    "small-vehicle", "helicopter", "roundabout", "soccer-ball-field", "swimming-pool",
    "container-crane",
)

# HRSSD of the paper is the 13-class HRRSD release (Zhang et al., TGRS 2019).
HRSSD_CLASSES = (
    "airplane", "baseball diamond", "basketball court", "bridge", "crossroad",
    "ground track field", "harbor", "parking lot", "ship", "storage tank",
    "T junction", "tennis court", "vehicle",
)

SYNTHETIC_RS_CLASSES = ("vehicle", "ship", "plane", "storage-tank")

# Object-size bands (sqrt of box area, pixels) used in every dataset summary.
SIZE_BANDS = ((0, 8, "<8"), (8, 16, "8-16"), (16, 32, "16-32"), (32, 96, "32-96"), (96, float("inf"), ">96"))


def size_band(width: float, height: float) -> str:
    """Name of the size band of a ``width`` x ``height`` box (measured as sqrt(area))."""
    side = (max(width, 0.0) * max(height, 0.0)) ** 0.5
    for low, high, name in SIZE_BANDS:
        if low <= side < high:
            return name
    return SIZE_BANDS[-1][2]
