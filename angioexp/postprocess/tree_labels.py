"""Tree-aware segment labelling: one label per skeleton branch, in anatomical order.

A per-pixel classifier can name half of a vessel piece "mid LAD" and the other half "distal
LAD", or call a piece "proximal" beyond its "distal" part. Segment names are properties of the
tree, so this step relabels the predicted vessel pixels branch by branch:

1. skeletonise the predicted vessel tree (every class but background and the catheter);
2. cut the skeleton at its bifurcations (pixels with ≥ 3 skeleton neighbours) into branches;
3. vote one label per branch: the class with the largest summed probability over its pixels;
4. root the branch graph at the ostium — the branch nearest the catheter when one is predicted,
   else the branch voted most confidently for a root segment (proximal RCA or left main) — and
   walk it outwards; along every path a segment family keeps its order (RCA proximal → mid →
   distal, LAD proximal → mid → distal, LCx proximal → distal): a branch named earlier in the
   family than one on its path to the root takes that later name;
5. give every vessel pixel the label of its nearest skeleton branch.

Not enforced (yet): the order of sibling branches along a parent (first before second
diagonal or marginal). Input and output are label maps over the caller's class indices.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from angioexp.segments import BY_SLUG

# family → slugs in proximal-to-distal order
FAMILIES: dict[str, tuple[str, ...]] = {
    "rca": ("rca_proximal", "rca_mid", "rca_distal"),
    "lad": ("lad_proximal", "lad_mid", "lad_distal"),
    "lcx": ("lcx_proximal", "lcx_distal"),
}
ROOT_SLUGS = ("rca_proximal", "left_main")
EIGHT = np.ones((3, 3), dtype=bool)


def _rank_table(category_ids: list[int]) -> dict[int, tuple[str, int]]:
    """class index (1-based position in ``category_ids``) → (family, rank) for ordered segments."""
    index = {c: k + 1 for k, c in enumerate(category_ids)}
    table = {}
    for family, slugs in FAMILIES.items():
        for rank, slug in enumerate(slugs):
            label = BY_SLUG[slug].label
            if label in index:
                table[index[label]] = (family, rank)
    return table


def label_tree(probs: np.ndarray, category_ids: list[int]) -> np.ndarray:
    """probs (1 + C, H, W) softmax over background + ``category_ids`` → int (H, W) class indices
    (0 = background, k = category_ids[k - 1]), relabelled branch by branch as described above."""
    pixel_labels = probs.argmax(0)
    catheter = {k + 1 for k, c in enumerate(category_ids) if c == BY_SLUG["catheter"].label}
    vessel = (pixel_labels > 0) & ~np.isin(pixel_labels, list(catheter))
    if not vessel.any():
        return pixel_labels
    skeleton = skeletonize(vessel)
    neighbours = ndimage.convolve(skeleton.astype(np.uint8), EIGHT.astype(np.uint8), mode="constant") - 1
    junctions = skeleton & (neighbours >= 3)
    branches, n = ndimage.label(skeleton & ~junctions, structure=EIGHT)
    if n == 0:
        return pixel_labels

    # 3. one vote per branch: summed class probabilities over its skeleton pixels
    flat = branches.ravel()
    on = flat > 0
    votes = np.stack([np.bincount(flat[on], weights=probs[k].ravel()[on], minlength=n + 1) for k in range(probs.shape[0])])
    votes[0] = 0  # a skeleton pixel is vessel: background is no candidate
    for k in catheter:
        votes[k] = 0
    branch_label = votes.argmax(0)  # (n + 1,), entry 0 unused

    # 4. branch graph: two branches touch when they meet at a junction (junction pixels dilated)
    touching = ndimage.binary_dilation(junctions, structure=EIGHT, iterations=2)
    junction_groups, _ = ndimage.label(touching, structure=EIGHT)
    adjacency: dict[int, set[int]] = {b: set() for b in range(1, n + 1)}
    members: dict[int, set[int]] = {}
    both = (junction_groups > 0) & (branches > 0)
    for group, branch in zip(junction_groups[both], branches[both]):
        members.setdefault(int(group), set()).add(int(branch))
    for group_branches in members.values():
        for b in group_branches:
            adjacency[b] |= group_branches - {b}

    ranks = _rank_table(category_ids)
    root_classes = [k + 1 for k, c in enumerate(category_ids) if c in {BY_SLUG[s].label for s in ROOT_SLUGS}]
    seen: set[int] = set()
    components, n_components = ndimage.label(np.isin(branches, np.arange(1, n + 1)) | touching, structure=EIGHT)
    for component in range(1, n_components + 1):
        in_component = sorted(set(np.unique(branches[(components == component) & (branches > 0)]).tolist()) - {0})
        if not in_component:
            continue
        root = _root(in_component, branches, votes, catheter, root_classes, pixel_labels)
        # breadth-first from the root: each branch carries the highest rank per family on its path
        queue = deque([(root, {})])
        seen.add(root)
        while queue:
            branch, highest = queue.popleft()
            label = int(branch_label[branch])
            if label in ranks:
                family, rank = ranks[label]
                if rank < highest.get(family, -1):
                    later = highest[family]
                    branch_label[branch] = next(k for k, fr in ranks.items() if fr == (family, later))
                    rank = later
                highest = {**highest, family: max(rank, highest.get(family, -1))}
            for child in sorted(adjacency[branch] - seen):
                seen.add(child)
                queue.append((child, highest))

    # 5. every vessel pixel takes its nearest branch's label
    _, (iy, ix) = ndimage.distance_transform_edt(branches == 0, return_indices=True)
    out = pixel_labels.copy()
    out[vessel] = branch_label[branches[iy[vessel], ix[vessel]]]
    return out


def _root(candidates: list[int], branches: np.ndarray, votes: np.ndarray, catheter: set[int], root_classes: list[int],
          pixel_labels: np.ndarray) -> int:
    """The ostium branch of one connected piece of tree (see the module docstring, step 4)."""
    cath = np.isin(pixel_labels, list(catheter)) if catheter else np.zeros_like(branches, dtype=bool)
    if cath.any():
        distance = ndimage.distance_transform_edt(~cath)
        nearest = ndimage.minimum(distance, labels=branches, index=candidates)
        return candidates[int(np.argmin(nearest))]
    if root_classes:
        total = votes[:, candidates].sum(0).clip(min=1e-12)
        confidence = votes[root_classes][:, candidates].max(0) / total
        return candidates[int(np.argmax(confidence))]
    return candidates[0]
