"""Hungarian matcher against brute-force enumeration of every assignment."""
import itertools
import math

import torch
from sdconet.modeling.matcher import HungarianMatcher


def slow_giou(a, b):
    """GIoU of two cxcywh boxes given as Python floats."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def slow_cost(logit, box, label, target_box, alpha=0.25, gamma=2.0):
    """The DINO matching cost of one (prediction, target) pair, weights 2 / 5 / 2."""
    p = 1 / (1 + math.exp(-logit[label]))
    focal = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p**gamma * -math.log(1 - p)
    l1 = sum(abs(x - y) for x, y in zip(box, target_box))
    return 2.0 * focal + 5.0 * l1 - 2.0 * slow_giou(box, target_box)


def random_case(seed, queries, num_targets, classes=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, queries, classes, generator=gen) * 2
    boxes = torch.cat([torch.rand(1, queries, 2, generator=gen), torch.rand(1, queries, 2, generator=gen) * 0.4 + 0.05], -1)
    target = {
        "labels": torch.randint(0, classes, (num_targets,), generator=gen),
        "boxes": torch.cat([torch.rand(num_targets, 2, generator=gen), torch.rand(num_targets, 2, generator=gen) * 0.4 + 0.05], -1),
    }
    return logits, boxes, target


def test_matches_brute_force_minimum():
    matcher = HungarianMatcher()
    queries = 5
    for seed in range(6):
        for num_targets in range(0, 5):
            logits, boxes, target = random_case(seed * 10 + num_targets, queries, num_targets)
            (pred_idx, tgt_idx), = matcher(logits, boxes, [target])
            assert len(pred_idx) == len(tgt_idx) == num_targets
            assert len(set(pred_idx.tolist())) == num_targets and sorted(tgt_idx.tolist()) == list(range(num_targets))
            cost = [[slow_cost(logits[0, q].tolist(), boxes[0, q].tolist(), int(target["labels"][t]),
                               target["boxes"][t].tolist()) for t in range(num_targets)] for q in range(queries)]
            best = min((sum(cost[q][t] for t, q in enumerate(perm))
                        for perm in itertools.permutations(range(queries), num_targets)), default=0.0)
            got = sum(cost[q][t] for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()))
            assert abs(got - best) < 1e-4, (seed, num_targets, got, best)


def test_batch_with_empty_image_and_obvious_match():
    matcher = HungarianMatcher()
    logits = torch.full((2, 3, 2), -5.0)
    logits[1, 2, 1] = 5.0  # query 2 confidently predicts class 1 ...
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2, 3, 1)
    boxes[1, 2] = torch.tensor([0.2, 0.3, 0.1, 0.1])  # ... exactly where the target is
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.3, 0.1, 0.1]])}]
    (p0, t0), (p1, t1) = matcher(logits, boxes, targets)
    assert p0.numel() == 0 and t0.numel() == 0 and p0.dtype == torch.int64
    assert p1.tolist() == [2] and t1.tolist() == [0]


def test_matching_several_sets_at_once_equals_one_by_one_with_one_host_transfer(host_reads):
    """The criterion matches all decoder layers and the encoder in one call: the same assignments
    as matching each set alone, with the costs reaching the host in one transfer."""
    matcher = HungarianMatcher()
    gen = torch.Generator().manual_seed(3)
    targets = []
    for num_targets in (3, 0, 5):  # an image without objects in the middle
        _, _, target = random_case(num_targets, 2, num_targets)
        targets.append(target)
    sets = []
    for queries in (7, 7, 9):  # the encoder set may hold another number of queries
        logits = torch.randn(3, queries, 3, generator=gen)
        boxes = torch.cat([torch.rand(3, queries, 2, generator=gen), torch.rand(3, queries, 2, generator=gen) * 0.4 + 0.05], -1)
        sets.append((logits, boxes))
    with host_reads:
        together = matcher.match_sets(sets, targets)
    assert host_reads.count == 2  # the costs' .cpu() and .numpy() of one concatenated tensor
    assert len(together) == len(sets)
    for (logits, boxes), got in zip(sets, together):
        alone = matcher(logits, boxes, targets)
        assert len(got) == len(targets)
        for (p, t), (p_ref, t_ref), target in zip(got, alone, targets):
            assert p.dtype == torch.int64 and len(p) == len(target["labels"])
            assert torch.equal(p, p_ref) and torch.equal(t, t_ref)
