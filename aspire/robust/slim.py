"""SLIM: spuriousness mitigation with minimal human annotations (Xuan et al. 2024, Sec. 4; code:
https://github.com/xiweix/SLIM).

1. Attention space (Sec. 4.1): Grad-CAM ``A`` (h, w) of the reference model at its last conv block, whose
   output is the feature map ``F`` (C, h, w); the attention-weighted feature ``F_A = sum_hw F A / sum_hw A`` is
   projected to 2-D with UMAP.
2. Annotation and expansion (Sec. 4.2): k-means on the attention space, the instance nearest each centre is
   shown to a person (yes/no: is the heat map on the object?), and label spreading turns the answers into a
   probability of correct attention for every instance.
3. Balanced curation (Sec. 4.3): keep instances with ``p >= threshold``; cluster ``F_A`` into core clusters
   ``c_i`` and ``F_Abar`` (weighted by ``1 - A``) into environment clusters ``e_j``; the subgroups
   ``g(c_i, e_j)`` get a share of the budget ``N`` from their clusters' spread (Eq. 3-6, below).
4. Training (Sec. 4.4): ERM on a curated train subset (SLIM_Tr), or last-layer retraining of the reference
   model on a curated validation subset (SLIM_Val, as DFR).

The sampling equations as implemented, with ``d_c(x)`` the distance of ``x`` to the centre of its cluster:

    (3)  1 / rho_ci = (1 / |C_i|) * sum_{x in C_i} d_ci(x)        mean distance in core cluster c_i
    (4)  n_ci = N * w_ci / sum_j w_cj,  w_ci = 1 / rho_ci
    (5)  1 / rho_ci,ej = (1 / |g(ci,ej)|) * sum_{x in g(ci,ej)} d_ej(x)   mean environment-space distance
    (6)  n_ci,ej = n_ci * w_ci,ej / sum_{ej' in E(ci)} w_ci,ej',  w_ci,ej = 1 / rho_ci,ej

The paper's Eq. 3 divides by the number of clusters |C| where a mean over the cluster's |C_i| members is
meant, and Eq. 6's denominator sums ``w_cj,ei`` where it means the subgroups ``e_j'`` of the same ``c_i``;
both are implemented as meant. ``E(ci)`` holds only the environment clusters that contain members of ``c_i``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading
from torch import nn
from torch.utils.data import DataLoader

from aspire.classifier import build_model, load_model, resolve_device
from aspire.config import ClassifierConfig
from aspire.images import load_rgb
from aspire.manifest import Row
from aspire.robust.base import IndexedRows, Trainer, TrainResult, check_rows, fit, num_classes
from aspire.robust.dfr import embed, linear_head, per_class_logits, strip_head
from aspire.robust.erm import ERMTrainer

log = logging.getLogger(__name__)

EPS = 1e-8
ANSWERS = ("yes", "no", "unsure")
PAIRS_PER_FILE, PAIRS_PER_ROW, MIN_TILE = 20, 4, 128  # query grids: 5 rows of 4 (image | heat map) pairs


# -- 1. attention space -------------------------------------------------------------------------------------


def last_conv_block(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM explains: ``layer4`` of a torchvision ResNet, else the last module
    before the first ``nn.AdaptiveAvgPool2d`` in ``model.features`` (SmallCNN: the last conv block's pooling).

    Raises:
        ValueError: a model of neither kind (named in the message).
    """
    if isinstance(model, torchvision.models.ResNet):
        return model.layer4
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        pools = [i for i, module in enumerate(features) if isinstance(module, nn.AdaptiveAvgPool2d)]
        if pools and pools[0] > 0:
            return features[pools[0] - 1]
    raise ValueError(f"model={type(model).__name__}: not a torchvision ResNet and no 'features' Sequential with a "
                     "module before an AdaptiveAvgPool2d; cannot find its last conv block for Grad-CAM")


def gradcam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (Selvaraju et al. 2017) of each image's target logit at :func:`last_conv_block`.

    ``cam = ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of d logit / d A_c, each cam divided by its
    max (an all-zero cam stays zero). The model runs in eval mode (its mode is restored afterwards); gradients
    are taken with ``torch.autograd.grad`` w.r.t. the activations only, so the parameters' ``requires_grad``
    and ``.grad`` are left as they were.

    Args:
        model: classifier; images and targets are moved to its device.
        images: (N, 3, H, W) normalised images.
        targets: (N,) class index per image.

    Returns:
        (feature maps (N, C, h, w) float32, cams (N, h, w) float32 in [0, 1]).
    """
    device = next(model.parameters()).device
    kept: list[torch.Tensor] = []
    hook = last_conv_block(model).register_forward_hook(lambda module, inputs, output: kept.append(output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().to(device).requires_grad_(True)  # activations need grad in a frozen model
            logits = model(x)  # (N, K)
            score = logits.gather(1, targets.to(device).view(-1, 1)).sum()  # eval mode: images are independent
            (grads,) = torch.autograd.grad(score, kept[0])  # (N, C, h, w)
    finally:
        hook.remove()
        model.train(was_training)
    maps = kept[0].detach()
    cams = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(1))  # (N, h, w)
    peak = cams.flatten(1).max(1).values.view(-1, 1, 1)
    cams = cams / torch.where(peak > 0, peak, torch.ones_like(peak))  # an all-zero cam stays zero
    return maps.float().cpu().numpy(), cams.float().cpu().numpy()


def gradcam_rows(model: nn.Module, rows: Sequence[Row], config: ClassifierConfig,
                 batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gradcam` of ``rows`` (targets: their labels) in batches of ``batch_size`` (default the config's).

    The feature maps of all rows are held in memory: (N, C, h, w) float32.
    """
    model.to(resolve_device(config.device))
    loader = DataLoader(IndexedRows(rows, config.image_size), batch_size=batch_size or config.batch_size,
                        num_workers=config.num_workers)
    batches = [gradcam(model, images, labels) for images, labels, _ in loader]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def attention_features(feature_maps: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention-weighted ``F_A = sum_hw F A / sum_hw A`` and inverse-attention-weighted ``F_Abar`` (``1 - A``).

    Args:
        feature_maps: (N, C, h, w).
        cams: (N, h, w) in [0, 1].

    Returns:
        (F_A (N, C), F_Abar (N, C)) float64.
    """
    f, a = feature_maps.astype(np.float64), cams.astype(np.float64)[:, None]  # a: (N, 1, h, w)
    f_a = (f * a).sum((2, 3)) / (a.sum((2, 3)) + EPS)
    f_abar = (f * (1 - a)).sum((2, 3)) / ((1 - a).sum((2, 3)) + EPS)
    return f_a, f_abar


def attention_space(f_a: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """The 2-D attention space: UMAP of ``F_A`` (N, C) -> (N, 2), ``n_neighbors`` clipped to N - 1.

    Raises:
        ValueError: fewer than 3 rows.
    """
    if len(f_a) < 3:
        raise ValueError(f"attention_space: {len(f_a)} rows, need at least 3 for UMAP")
    import umap  # slow to import (numba): only here

    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(f_a) - 1), random_state=seed, n_jobs=1)
    return reducer.fit_transform(f_a).astype(np.float64)


# -- 2. annotation and expansion ----------------------------------------------------------------------------


@dataclass
class Attention:
    """Steps 1-2 on a pool: Grad-CAMs (N, h, w), ``F_A`` and ``F_Abar`` (N, C), the 2-D attention space and the
    query row indices."""

    cams: np.ndarray
    f_a: np.ndarray
    f_abar: np.ndarray
    space: np.ndarray
    queries: list[int]


def attention_queries(model: nn.Module, pool: Sequence[Row], config: ClassifierConfig, n_queries: int,
                      seed: int) -> Attention:
    """Grad-CAM of ``pool``, its attention space and the ``n_queries`` rows to ask about (Sec. 4.1-4.2): what the
    trainer curates from and what ``aspire slim`` shows a person."""
    maps, cams = gradcam_rows(model, pool, config)
    f_a, f_abar = attention_features(maps, cams)
    space = attention_space(f_a, seed)
    labels = np.array([row["label"] for row in pool])
    return Attention(cams, f_a, f_abar, space, select_queries(space, labels, n_queries, seed))


def even_split(total: int, capacities: Sequence[int]) -> list[int]:
    """``total`` split as equally as possible, each share capped at its capacity, the rest to the others
    (the earlier entries take the remainder); sums to ``min(total, sum(capacities))``."""
    counts, remaining = [0] * len(capacities), min(total, sum(capacities))
    while remaining > 0:
        open_ = [i for i, cap in enumerate(capacities) if counts[i] < cap]
        share, extra = divmod(remaining, len(open_))
        for rank, i in enumerate(open_):
            add = min(capacities[i] - counts[i], share + (rank < extra))
            counts[i] += add
            remaining -= add
    return counts


def select_queries(space: np.ndarray, labels: np.ndarray, n_queries: int, seed: int) -> list[int]:
    """The rows to ask about: per class, k-means on the attention space and the row nearest each centre.

    Sec. 4.2: the clusters give diversity, the nearest rows typicality. The budget is split over the classes as
    equally as possible (:func:`even_split`); a class gets at most as many clusters as it has distinct points.

    Args:
        space: (N, 2) attention space.
        labels: (N,) class labels.
        n_queries: total number of queries.
        seed: k-means seed.

    Returns:
        Sorted row indices.
    """
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    distinct = [len(np.unique(space[idx], axis=0)) for idx in members]
    queries: list[int] = []
    for idx, n in zip(members, even_split(n_queries, distinct)):
        if n == 0:
            continue
        kmeans = KMeans(n_clusters=n, n_init=10, random_state=seed).fit(space[idx])
        for j, centre in enumerate(kmeans.cluster_centers_):
            own = idx[kmeans.labels_ == j]
            queries.append(int(own[np.linalg.norm(space[own] - centre, axis=1).argmin()]))
    return sorted(queries)


def spread_labels(space: np.ndarray, answers: dict[int, bool], n_neighbors: int = 7) -> np.ndarray:
    """Probability of correct attention for every row: label spreading (Zhou et al. 2004, kNN kernel) of the
    answers over the attention space; one answer value for all answered rows gives that value everywhere, and
    rows that no answer reaches on the kNN graph get 0.5.

    Args:
        space: (N, 2) attention space.
        answers: row index -> correct attention (True) or not; unsure rows are left out by the caller.
        n_neighbors: kNN graph size, clipped to N - 1.

    Returns:
        (N,) float64 in [0, 1].

    Raises:
        ValueError: no answers, or an index outside the rows.
    """
    if not answers:
        raise ValueError("spread_labels: no answers (every query was unsure?); need at least one yes or no")
    if min(answers) < 0 or max(answers) >= len(space):
        raise ValueError(f"spread_labels: answer indices must be in 0..{len(space) - 1}, got {sorted(answers)}")
    values = set(answers.values())
    if len(values) == 1:
        return np.full(len(space), float(values.pop()))
    y = np.full(len(space), -1)
    y[list(answers)] = [int(v) for v in answers.values()]
    spreading = LabelSpreading(kernel="knn", n_neighbors=min(n_neighbors, len(space) - 1)).fit(space, y)
    dist = spreading.label_distributions_  # (N, 2); all zero where no answer is reachable on the kNN graph
    prob = dist[:, list(spreading.classes_).index(1)].astype(np.float64)
    return np.where(dist.sum(1) > 0, prob, 0.5)


# -- 3. balanced curation -----------------------------------------------------------------------------------


def cluster(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means (``k`` clipped to the number of distinct rows): (assignment (N,), distance to own centre (N,))."""
    k = max(1, min(k, len(np.unique(features, axis=0))))
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    distance = np.linalg.norm(features - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    return kmeans.labels_.astype(int), distance


def _normalised(weights: np.ndarray) -> np.ndarray:
    """Weights divided by their sum; all-zero weights (every member on its centre) become equal ones."""
    total = weights.sum()
    return weights / total if total > 0 else np.full(len(weights), 1.0 / len(weights))


def allocate(core_cluster: np.ndarray, core_dist: np.ndarray, env_cluster: np.ndarray, env_dist: np.ndarray,
             budget: int) -> dict[tuple[int, int], int]:
    """Rows to draw from each subgroup ``g(ci, ej)`` (Eq. 3-6 of the module docstring).

    The real-valued Eq. 6 targets (summing to ``budget``) become integers by largest remainder; a count above
    its subgroup's size is capped, and what caps leave over is split again over the uncapped subgroups in
    proportion to their Eq. 6 shares (same rounding) until the budget is met or every row is taken.

    Args:
        core_cluster, core_dist: (N,) core cluster of each row and its distance to that cluster's centre.
        env_cluster, env_dist: (N,) environment cluster of each row and its distance to that centre.
        budget: rows to draw in all.

    Returns:
        ``{(ci, ej): count}`` for every non-empty subgroup; counts sum to ``min(budget, N)``.
    """
    cores = np.unique(core_cluster)
    w_core = _normalised(np.array([core_dist[core_cluster == c].mean() for c in cores]))  # Eq. 3-4
    keys, sizes, shares = [], [], []
    for c, w_c in zip(cores, w_core):
        envs = np.unique(env_cluster[core_cluster == c])
        masks = [(core_cluster == c) & (env_cluster == e) for e in envs]
        w_env = _normalised(np.array([env_dist[m].mean() for m in masks]))  # Eq. 5-6
        keys += [(int(c), int(e)) for e in envs]
        sizes += [int(m.sum()) for m in masks]
        shares += list(w_c * w_env)
    sizes_, shares_ = np.array(sizes), np.array(shares)
    counts, remaining = np.zeros(len(keys), dtype=int), min(budget, int(sizes_.sum()))
    while remaining > 0:
        open_ = counts < sizes_
        share = np.where(open_, shares_, 0.0)
        target = remaining * (share / share.sum() if share.sum() > 0 else open_ / open_.sum())
        add = np.floor(target).astype(int)
        rest = remaining - add.sum()
        add[np.argsort(-(target - add), kind="stable")[:rest]] += 1  # largest remainders, first of equals
        add = np.minimum(add, sizes_ - counts)
        counts += add
        remaining -= int(add.sum())
    return dict(zip(keys, counts.tolist()))


def curate(space_prob: np.ndarray, screen_threshold: float, f_a: np.ndarray, f_abar: np.ndarray, labels: np.ndarray,
           budget: int, n_core: int, n_env: int, seed: int) -> tuple[list[int], dict[tuple[int, int, int], int]]:
    """The curated subset (Sec. 4.3): screening, then per class core/environment clustering and Eq. 3-6.

    1. Screening keeps rows with ``space_prob >= screen_threshold``; a class left with fewer rows than its share
       of the budget, ``ceil(budget / K)``, keeps that many rows of highest probability instead (the curated set
       stays class-balanced, as the paper intends, when the reference model attends wrongly on most of a class).
    2. The budget is split equally over the classes (:func:`even_split` over the kept rows): the paper balances
       core features, and the classes are the coarsest of them.
    3. Per class: ``n_core`` k-means clusters of ``F_A`` and ``n_env`` of ``F_Abar`` (both clipped to the
       class's rows), :func:`allocate`, and the allocated count drawn at random from each subgroup.

    Args:
        space_prob: (N,) probability of correct attention.
        screen_threshold: minimum probability to keep a row.
        f_a, f_abar: (N, C) attention- and inverse-attention-weighted features.
        labels: (N,) class labels.
        budget: size of the curated set (at most the kept rows).
        n_core, n_env: clusters per class in the core and environment feature spaces.
        seed: seed of the clustering and the draws.

    Returns:
        (sorted row indices, ``{(class, ci, ej): count}``).
    """
    rng, classes = np.random.default_rng(seed), np.unique(labels)
    kept = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        passed = idx[space_prob[idx] >= screen_threshold]
        share = min(len(idx), -(-budget // len(classes)))
        if len(passed) < share:  # never starve a class: top it up with its most likely correct rows
            passed = idx[np.argsort(-space_prob[idx], kind="stable")[:share]]
            log.warning("SLIM: screening left class %s fewer rows than its share; keeping its %d most likely "
                        "correct", c, len(passed))
        kept.append(passed)
    chosen: list[int] = []
    allocation: dict[tuple[int, int, int], int] = {}
    for c, idx, quota in zip(classes, kept, even_split(budget, [len(k) for k in kept])):
        core, core_dist = cluster(f_a[idx], n_core, seed)
        env, env_dist = cluster(f_abar[idx], n_env, seed)
        for (ci, ej), n in allocate(core, core_dist, env, env_dist, quota).items():
            allocation[(int(c), ci, ej)] = n
            chosen += rng.choice(idx[(core == ci) & (env == ej)], n, replace=False).tolist()
    return sorted(chosen), allocation


# -- annotators ---------------------------------------------------------------------------------------------


def core_box(row: Row) -> list[float] | None:
    """The row's first box whose phrase is its class name (the object itself), or None."""
    return next((b["box"] for b in row.get("boxes") or [] if b.get("phrase") == row["class_name"]), None)


def simulated_answers(cams: np.ndarray, boxes: Sequence[list[float] | None], image_sizes: Sequence[tuple[int, int]],
                      flip_rate: float = 0.0, seed: int = 0) -> list[bool]:
    """A simulated annotator: "yes" when more than half of the heat map's mass at pixels with cam >= 0.8 lies in
    the object's box, each answer then flipped with probability ``flip_rate`` (people agree ~95%, Sec. 5.3).

    Args:
        cams: (N, h, w) in [0, 1], upsampled (bilinear) to each image's size.
        boxes: per row, the object box ``[x0, y0, x1, y1]`` in image pixels (:func:`core_box`); None answers no.
        image_sizes: per row, the image's (width, height).
        flip_rate: probability of flipping an answer.
        seed: seed of the flips.

    Returns:
        One answer per row (True = the attention is on the object).
    """
    answers = []
    for cam, box, (width, height) in zip(cams, boxes, image_sizes):
        if box is None:
            answers.append(False)
            continue
        up = nn.functional.interpolate(torch.from_numpy(cam)[None, None].float(), size=(height, width),
                                       mode="bilinear", align_corners=False)[0, 0].numpy()  # (H, W)
        inside = np.zeros_like(up, dtype=bool)
        x0, y0, x1, y1 = box
        inside[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        hot = np.where(up >= 0.8, up, 0.0)
        answers.append(bool(hot.sum() > 0 and hot[inside].sum() > 0.5 * hot.sum()))
    missing = sum(box is None for box in boxes)
    if missing:
        log.warning("simulated annotator: %d of %d rows have no box of their class (answered no)", missing, len(boxes))
    flips = np.random.default_rng(seed).random(len(answers)) < flip_rate
    return [a != bool(f) for a, f in zip(answers, flips)]


# -- person-facing files ------------------------------------------------------------------------------------


def simulate_queries(pool: Sequence[Row], queries: Sequence[int], cams: np.ndarray, flip_rate: float,
                     seed: int) -> list[bool]:
    """:func:`simulated_answers` for the query rows of ``pool`` (their core boxes and image sizes read here)."""
    sizes = []
    for i in queries:
        with Image.open(pool[i]["path"]) as image:
            sizes.append(image.size)
    return simulated_answers(cams[list(queries)], [core_box(pool[i]) for i in queries], sizes, flip_rate, seed)


class MissingAnswers(ValueError):
    """The annotations file has queries without an answer (or does not exist yet)."""


def _jet(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 jet colours (blue = 0, red = 1)."""
    x = 4 * values[..., None]
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def write_queries(out_dir: Path, rows: Sequence[Row], query_indices: Sequence[int], cams: np.ndarray,
                  config: ClassifierConfig) -> Path:
    """Write what a person needs to answer the queries: ``queries-001.png``... (up to 20 image | heat-map pairs
    each, image id below), ``annotations.csv`` (image_id, class, empty answer; in query order), ``README.txt``.

    Args:
        out_dir: folder to write into (created).
        rows: the pool rows; ``cams`` (N, h, w) are theirs.
        query_indices: rows to ask about.
        config: the model's input size (``image_size``) is the tile size (at least 128 px).

    Returns:
        The path of ``annotations.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tile, band = max(config.image_size, MIN_TILE), 14  # band: the text line under each pair
    for start in range(0, len(query_indices), PAIRS_PER_FILE):
        page = query_indices[start : start + PAIRS_PER_FILE]
        n_rows = -(-len(page) // PAIRS_PER_ROW)
        sheet = Image.new("RGB", (PAIRS_PER_ROW * 2 * tile, n_rows * (tile + band)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, i in enumerate(page):
            x, y = (k % PAIRS_PER_ROW) * 2 * tile, (k // PAIRS_PER_ROW) * (tile + band)
            image = load_rgb(rows[i]["path"]).resize((tile, tile), Image.BILINEAR)  # as the model sees it
            heat = Image.fromarray((cams[i] * 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
            overlay = Image.blend(image, Image.fromarray(_jet(np.asarray(heat) / 255.0)), 0.5)
            sheet.paste(image, (x, y))
            sheet.paste(overlay, (x + tile, y))
            draw.text((x + 2, y + tile + 1), f"{rows[i]['image_id']} ({rows[i]['class_name']})", fill="black")
        sheet.save(out_dir / f"queries-{start // PAIRS_PER_FILE + 1:03d}.png")
    path = out_dir / "annotations.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "class", "answer"])
        writer.writerows([rows[i]["image_id"], rows[i]["class_name"], ""] for i in query_indices)
    (out_dir / "README.txt").write_text(
        "Each pair in queries-*.png shows an image and, beside it, where the model looks (red = most).\n"
        "For every row of annotations.csv, write in the answer column:\n"
        "  yes    - the heat map sits on the object of the class named in the class column\n"
        "  no     - it sits elsewhere (background, another object)\n"
        "  unsure - you cannot tell (the row is then left out)\n", encoding="utf-8")
    log.info("wrote %d SLIM queries to %s", len(query_indices), out_dir)
    return path


def read_answers(path: Path) -> dict[str, str]:
    """Read a filled ``annotations.csv``: image id -> ``yes``/``no``/``unsure`` (case and spaces ignored).

    Raises:
        ValueError: no ``image_id``/``answer`` columns, a duplicate id or an unknown answer (file and 1-based
            data row named).
        MissingAnswers: some answers are empty (file, count and the first ids named).
    """
    answers: dict[str, str] = {}
    missing: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "image_id" not in columns or "answer" not in columns:
            raise ValueError(f"{path}: expected columns image_id,class,answer; found {','.join(columns) or 'none'}")
        for n, raw in enumerate(reader, start=1):
            if None in raw:  # DictReader puts fields beyond the header under the key None
                raise ValueError(f"{path}: row {n} has more fields than the header {','.join(columns)}")
            row = {k.strip(): (v or "").strip() for k, v in raw.items()}
            image_id, answer = row["image_id"], row["answer"].lower()
            if image_id in answers or image_id in missing:
                raise ValueError(f"{path}: row {n}: image_id {image_id!r} appears twice")
            if answer and answer not in ANSWERS:
                raise ValueError(f"{path}: row {n} ({image_id}): answer {row['answer']!r} is not one of "
                                 "yes, no, unsure")
            if answer:
                answers[image_id] = answer
            else:
                missing.append(image_id)
    if missing:
        raise MissingAnswers(f"{path}: {len(missing)} of {len(missing) + len(answers)} answers are missing "
                             f"(first: {', '.join(missing[:5])}); write yes, no or unsure for each")
    return answers


# -- 4. the trainer -----------------------------------------------------------------------------------------


class SLIMTrainer(Trainer):
    """SLIM (Xuan et al. 2024, https://github.com/xiweix/SLIM, Sec. 4): curate a small feature-balanced subset
    from a reference model's attention and a few yes/no answers, then train on it. No group labels are used.

    Args:
        mode: ``train`` (SLIM_Tr: ERM on a curated train subset) or ``val`` (SLIM_Val: last-layer retraining of
            the reference model on a curated validation subset).
        reference_model: the ERM reference model f_r.
        reference_model_path: a model saved by :func:`aspire.classifier.save_model`, used when
            ``reference_model`` is None; with neither, ERM is trained on the train rows.
        annotations: a filled ``annotations.csv`` (annotator ``file``); when it does not exist, the queries are
            written beside it (:func:`write_queries`) and :class:`MissingAnswers` is raised.
        annotator: ``file`` (a person's answers), ``simulated`` (:func:`simulated_answers` from the boxes) or
            ``random`` (the control: a random class-balanced subset of the curated size, no queries).
        n_queries: annotation budget (Table 4, Waterbirds: 120 for SLIM_Tr, 40 for SLIM_Val).
        budget_fraction: curated set size as a fraction of the pool (Table 4: 0.05-0.3).
        n_core, n_env: clusters per class of the core and environment features.
        screen_threshold: minimum probability of correct attention to keep a row.
        flip_rate: the simulated annotator's error rate.
    """

    def __init__(self, mode: Literal["train", "val"] = "train", reference_model: nn.Module | None = None,
                 reference_model_path: str | None = None, annotations: str | None = None,
                 annotator: Literal["file", "simulated", "random"] = "file", n_queries: int = 120, budget_fraction: float = 0.1,
                 n_core: int = 4, n_env: int = 4, screen_threshold: float = 0.5, flip_rate: float = 0.0) -> None:
        if mode not in ("train", "val"):
            raise ValueError(f"mode={mode!r}: expected 'train' (SLIM_Tr) or 'val' (SLIM_Val)")
        if annotator not in ("file", "simulated", "random"):
            raise ValueError(f"annotator={annotator!r}: expected 'file', 'simulated' or 'random'")
        if annotator == "file" and annotations is None:
            raise ValueError("annotations=None: annotator 'file' needs the path of an annotations.csv")
        if n_queries < 1 or n_core < 1 or n_env < 1:
            raise ValueError(f"n_queries={n_queries}, n_core={n_core}, n_env={n_env}: each must be >= 1")
        if not 0 < budget_fraction <= 1:
            raise ValueError(f"budget_fraction={budget_fraction}: expected 0 < budget_fraction <= 1")
        if not 0 <= screen_threshold <= 1 or not 0 <= flip_rate <= 1:
            raise ValueError(f"screen_threshold={screen_threshold}, flip_rate={flip_rate}: "
                             "each must be in [0, 1]")
        if reference_model is None and reference_model_path is not None:
            reference_model = load_model(Path(reference_model_path))[0]
        self.mode, self.reference_model, self.annotator = mode, reference_model, annotator
        self.annotations = None if annotations is None else Path(annotations)
        self.n_queries, self.budget_fraction, self.n_core, self.n_env = n_queries, budget_fraction, n_core, n_env
        self.screen_threshold, self.flip_rate = screen_threshold, flip_rate

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Curate the pool (train rows, or val rows in mode ``val``) and train on the curated rows.

        Raises:
            ValueError: malformed or empty rows, an annotations file naming ids outside the pool, or (mode
                ``val``) a curated set missing a class.
            MissingAnswers: the annotations file does not exist yet (queries written) or has empty answers.
        """
        # 1. The pool and the reference model (selected without group labels, like everything in SLIM).
        check_rows(train_rows, "train_rows")
        generated = [row for row in train_rows if row.get("source") == "generated"]  # ASPIRE App. A.4: they join
        train_rows = [row for row in train_rows if row.get("source") != "generated"]  # the curated set as they are
        if self.mode == "val":
            check_rows(val_rows, "val_rows")
        pool = list(train_rows if self.mode == "train" else val_rows)
        val_plain = [{k: v for k, v in row.items() if k != "group"} for row in val_rows]
        history, best_epoch, reference = [], None, self.reference_model
        if reference is None:
            erm = ERMTrainer().train(train_rows, val_plain, config, seed)
            history, best_epoch, reference = erm.history, erm.best_epoch, erm.model
        labels = np.array([row["label"] for row in pool])
        budget = max(1, round(self.budget_fraction * len(pool)))
        if self.annotator == "random":  # the control: the curated set's size, drawn at random per class
            chosen = random_subset(labels, budget, seed)
            extras = {"mode": self.mode, "n_queries": 0, "answers": {}, "curated_size": len(chosen),
                      "curated_ids": [pool[i]["image_id"] for i in chosen], "budget": {"answers": 0}}
            return self._fit(reference, [pool[i] for i in chosen], labels[chosen], train_rows, val_rows, val_plain,
                             config, seed, extras, history, best_epoch, generated)
        # 2. Attention space and queries.
        att = attention_queries(reference, pool, config, self.n_queries, seed)
        queries = att.queries
        # 3. Answers, spread over the attention space.
        answers, counts = self._answers(pool, queries, att.cams, config, seed)
        prob = spread_labels(att.space, answers)
        # 4. Curation.
        chosen, allocation = curate(prob, self.screen_threshold, att.f_a, att.f_abar, labels, budget, self.n_core,
                                    self.n_env, seed)
        curated = [pool[i] for i in chosen]
        log.info("SLIM_%s: %d queries (%s), curated %d of %d rows", self.mode, len(queries), counts, len(curated),
                 len(pool))
        extras = {"mode": self.mode, "n_queries": len(queries), "query_ids": [pool[i]["image_id"] for i in queries],
                  "answers": counts, "curated_ids": [row["image_id"] for row in curated], "curated_size": len(curated),
                  "allocation": [{"class": c, "core": ci, "env": ej, "n": n} for (c, ci, ej), n in allocation.items()],
                  "budget": {"answers": counts.get("yes", 0) + counts.get("no", 0) + counts.get("unsure", 0)}}
        return self._fit(reference, curated, labels[chosen], train_rows, val_rows, val_plain, config, seed, extras,
                         history, best_epoch, generated)

    def _fit(self, reference, curated, curated_labels, train_rows, val_rows, val_plain, config, seed, extras,
             history, best_epoch, generated) -> TrainResult:
        """5. Training on the curated rows plus the generated ones: ERM (mode train) or the reference model's last
        layer (mode val)."""
        k = num_classes(train_rows, val_rows)
        extras["generated_added"] = len(generated)
        curated = [*curated, *generated]
        curated_labels = np.concatenate([curated_labels, [row["label"] for row in generated]]).astype(int)
        if self.mode == "train":
            config = config.model_copy(update={"seed": seed})
            model = build_model(config, k)
            history, best_epoch = fit(model, curated, val_plain, config, seed)
            extras["selection"] = "average validation accuracy, no group labels"
        else:
            backbone = strip_head(reference)
            model = nn.Sequential(backbone, fit_head(embed(backbone, curated, config), curated_labels, k, seed)).eval()
            extras["selection"] = "none: last-layer fit"
        return TrainResult(model, history, best_epoch, extras)

    def _answers(self, pool: list[Row], queries: list[int], cams: np.ndarray, config: ClassifierConfig,
                 seed: int) -> tuple[dict[int, bool], dict[str, int]]:
        """Row index -> correct attention (unsure answers left out), and the yes/no/unsure counts."""
        if self.annotator == "simulated":
            said = simulate_queries(pool, queries, cams, self.flip_rate, seed)
            answers = dict(zip(queries, said))
            return answers, {"yes": sum(said), "no": len(said) - sum(said), "unsure": 0}
        if not self.annotations.is_file():
            written = write_queries(self.annotations.parent, pool, queries, cams, config)
            raise MissingAnswers(f"{self.annotations}: no such file; wrote {len(queries)} queries to {written} "
                                 f"(see README.txt beside it): answer them and give that file as annotations")
        index = {row["image_id"]: i for i, row in enumerate(pool)}
        given = read_answers(self.annotations)
        unknown = [image_id for image_id in given if image_id not in index]
        if unknown:
            raise ValueError(f"{self.annotations}: {len(unknown)} image ids are not in the {self.mode} rows "
                             f"(first: {', '.join(unknown[:5])})")
        answers = {index[image_id]: answer == "yes" for image_id, answer in given.items() if answer != "unsure"}
        asked = sum(pool[i]["image_id"] in given for i in queries)
        log.info("SLIM: %d of %d queries answered in %s", asked, len(queries), self.annotations)
        return answers, {a: Counter(given.values())[a] for a in ANSWERS}


def random_subset(labels: np.ndarray, budget: int, seed: int) -> list[int]:
    """``budget`` row indices drawn at random, split over the classes as :func:`curate` splits them (sorted)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    shares = even_split(budget, [int((labels == c).sum()) for c in classes])
    return sorted(int(i) for c, n in zip(classes, shares) for i in rng.choice(np.flatnonzero(labels == c), n, replace=False))


def fit_head(x: np.ndarray, y: np.ndarray, k: int, seed: int) -> nn.Linear:
    """L2 logistic regression (lbfgs, softmax, C=1) on standardised features, folded into an ``nn.Linear``.

    Raises:
        ValueError: ``y`` misses one of the classes 0..k-1.
    """
    if set(np.unique(y)) != set(range(k)):
        raise ValueError(f"SLIM_val: the curated rows have classes {sorted(set(y.tolist()))}, need all of 0..{k - 1}")
    mean, std = x.mean(0), x.std(0) + EPS
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit((x - mean) / std, y)
    return linear_head(*per_class_logits(clf.coef_, clf.intercept_, k), mean, std)
