"""``btd fit-localiser``: a light decoder that maps the classifier's own features to a tumour map.

Supervision we hold: the LGG tumour masks (drawn on FLAIR, registered to T1 and T1 post-contrast: the
``mask`` column of lgg-tcga-flair's and lgg-tcga-t1's indexes; tumour-free slices have empty masks) and
the figshare-cheng tumour boxes (a box says where the tumour is, not its outline). The decoder reads
layer2 (28x28 at a 224 input), layer3 (14x14) and layer4 (7x7) of the checkpoint's trunk, each first
projected onto its leading principal directions (whitened; fitted here, fixed), upsamples them to
layer2's grid and fuses them with three small convolutions into one logit per cell. The trunk is not
trained: the classifier and its CAM are exactly those of the checkpoint, and the map is computed in the
same forward pass (``btd export`` adds the ``tumour_map`` output and the ``btd.localisation`` metadata).

Losses: masks, per-pixel binary cross-entropy plus a soft Dice on slices with a tumour; boxes, the
cells outside the box are pushed to 0 and, along every row and column crossing the box, the largest
cell inside it to 1 (the projection loss of box-supervised segmentation: the map must reach each side
of the box and stay inside it). The projected features of every image are extracted once (the slow
part) and cached, so the decoder trains in minutes.

The threshold (a map cell's probability for a region) is the one that maximises the mean Dice on the
validation patients' tumour slices; the figures on the test rows are written beside the CAM's.

The maps come from a ``FeatureSource``: a checkpoint's trunk in torch (``TorchTrunk``; the decoder is
stored in the checkpoint and ``btd export`` adds it), or an exported ONNX model run by ONNX Runtime
(``model_export.graft.OnnxTrunk``; the decoder is grafted into that file's graph, see that module).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from app.core.contract import Framing, PreprocessSpec, frame, normalise
from model_export.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from model_export.localisation import Box
from model_export.options import FitLocaliserConfig
from model_export.resnet import ResNet50
from model_export.samples import read_gray

log = logging.getLogger(__name__)

LGG_SOURCES = ("lgg-tcga-flair", "lgg-tcga-t1")
FIGSHARE = "figshare-cheng"
EVAL_SIDE = 224  # Dice, IoU and the pointing game are measured on the model's input square at this side


@dataclass(frozen=True)
class Row:
    """One image with its localisation label: a mask file (LGG) or a box (figshare)."""

    image: Path
    split: str
    source: str  # "flair", "t1pre", "t1post" (LGG) or "figshare"
    label: str
    mask: Path | None = None
    box: Box | None = None


def localisation_rows(data_dir: Path) -> list[Row]:
    """Every LGG slice (three sequences, patient split) and every figshare-cheng slice (group split)."""
    rows: list[Row] = []
    flair = data_dir / "lgg-tcga-flair"
    with (flair / "index.csv").open(newline="") as fh:
        rows += [Row(flair / r["path"], r["split"], "flair", r["label"], mask=flair / r["mask"])
                 for r in csv.DictReader(fh)]
    t1 = data_dir / "lgg-tcga-t1"
    if (t1 / "index.csv").is_file():
        with (t1 / "index.csv").open(newline="") as fh:
            rows += [Row(t1 / r["path"], r["split"], r["sequence"], r["label"], mask=flair / r["mask"])
                     for r in csv.DictReader(fh)]
    fig = data_dir / FIGSHARE
    with (fig / "index.csv").open(newline="") as fh:
        rows += [Row(fig / r["image"], r["in_4class_splits"], "figshare", r["label"],
                     box=Box.from_yolo((fig / r["box"]).read_text())) for r in csv.DictReader(fh)]
    return rows


def to_input_square(image: np.ndarray, framing: Framing, side: int) -> np.ndarray:
    """A map over the decoded image (e.g. a mask) cut to the model's input square, ``side`` pixels:
    what the model's input shows of it (zero outside the image)."""
    scale = side / framing.side
    matrix = np.array([[scale, 0.0, -framing.x * scale], [0.0, scale, -framing.y * scale]])
    return cv2.warpAffine(image.astype(np.float32), matrix, (side, side), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def box_in_input(box: Box, framing: Framing, width: int, height: int) -> Box:
    """A normalised image box -> normalised coordinates of the model's input square."""
    def along(v: float, size: int, origin: float) -> float:
        return (v * size - origin) / framing.side
    return Box(along(box.x0, width, framing.x), along(box.y0, height, framing.y),
               along(box.x1, width, framing.x), along(box.y1, height, framing.y))


class Projection(nn.Module):
    """Fixed whitened principal-component projection of a feature map (a 1x1 convolution)."""

    def __init__(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        super().__init__()
        k, c = components.shape
        self.conv = nn.Conv2d(c, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(components[:, :, None, None])
            self.conv.bias.copy_(-(components @ mean))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    @classmethod
    def fit(cls, maps: torch.Tensor, k: int) -> Projection:
        """Principal directions of the pixel vectors of ``maps`` [N, C, h, w], scaled to unit variance."""
        x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T)
        values, vectors = torch.linalg.eigh(cov)
        order = torch.argsort(values, descending=True)[:k]
        components = (vectors[:, order] / values[order].clamp_min(1e-8).sqrt()).T
        return cls(components.float(), mean.float())


class TumourDecoder(nn.Module):
    """Projected layer2/3/4 maps -> one tumour logit per layer2 cell."""

    def __init__(self, channels: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Conv2d(sum(channels), width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor) -> torch.Tensor:
        size = p2.shape[-2:]
        up = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in (p3, p4)]
        return self.fuse(torch.cat([p2, *up], dim=1))


class Localiser(nn.Module):
    """Trunk maps (layer2, layer3, layer4) -> tumour probability map [N, 1, h2, w2]."""

    def __init__(self, projections: Sequence[Projection], decoder: TumourDecoder) -> None:
        super().__init__()
        self.projections = nn.ModuleList(projections)
        self.decoder = decoder

    def forward(self, l2: torch.Tensor, l3: torch.Tensor, l4: torch.Tensor) -> torch.Tensor:
        p2, p3, p4 = (proj(x) for proj, x in zip(self.projections, (l2, l3, l4)))
        return torch.sigmoid(self.decoder(p2, p3, p4))

    def state(self) -> dict:
        return {"channels": [p.conv.out_channels for p in self.projections],
                "in_channels": [p.conv.in_channels for p in self.projections],
                "width": self.decoder.fuse[0].out_channels, "weights": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict) -> Localiser:
        projections = [Projection(torch.zeros(k, c), torch.zeros(c))
                       for k, c in zip(state["channels"], state["in_channels"])]
        localiser = cls(projections, TumourDecoder(state["channels"], state["width"]))
        localiser.load_state_dict(state["weights"])
        return localiser.eval()


def trunk_maps(model: ResNet50, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """layer2, layer3 and layer4 outputs of the trunk."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    l2 = model.layer2(model.layer1(x))
    l3 = model.layer3(l2)
    return l2, l3, model.layer4(l3)


class FeatureSource(Protocol):
    """Where the frozen maps come from: ``maps`` gives layer2, layer3, layer4 and the logits of a
    preprocessed batch; ``cam_weights`` [C, K] are the classifier's (for the CAM comparison)."""

    spec: PreprocessSpec
    cam_weights: torch.Tensor

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


class TorchTrunk:
    """A checkpoint's network in torch."""

    def __init__(self, model: ResNet50, spec: PreprocessSpec) -> None:
        self.model, self.spec = model.eval(), spec
        self.cam_weights = model.fc.weight.detach()

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            l2, l3, l4 = trunk_maps(self.model, x)
            return l2, l3, l4, self.model.fc(l4.mean(dim=(2, 3)))


@dataclass
class Extracted:
    """Per image: projected maps (float16), the target on the map grid, the input-square label for
    evaluation (mask at EVAL_SIDE, or the box), the CAM of the predicted class (for comparison)."""

    p2: np.ndarray
    p3: np.ndarray
    p4: np.ndarray
    target: np.ndarray  # [N, h2, w2] soft mask; for box rows the box's cells (not a target: see loss)
    boxes: np.ndarray  # [N, 4] x0 y0 x1 y1 in the input square (normalised); NaN for mask rows
    eval_masks: np.ndarray  # [N, EVAL_SIDE, EVAL_SIDE] uint8 (mask rows of val/test only; zeros otherwise)
    cams: np.ndarray  # [N, 7, 7]


def extract(source: FeatureSource, rows: Sequence[Row], projections: Sequence[Projection],
            batch_size: int, keep_eval: Sequence[bool]) -> Extracted:
    spec = source.spec
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("p2", "p3", "p4", "target", "boxes", "eval", "cams")}
    for start in tqdm(range(0, len(rows), batch_size), desc="features", unit="batch", leave=False):
        batch = rows[start : start + batch_size]
        tensors, targets, boxes, evals = [], [], [], []
        for i, row in enumerate(batch, start):
            gray = read_gray(row.image)
            unit, framing = frame(gray, spec)
            tensors.append(normalise(unit, spec))
            h, w = gray.shape
            grid = spec.size // 8
            if row.mask is not None:
                mask = cv2.imread(str(row.mask), cv2.IMREAD_GRAYSCALE)
                if mask.shape != gray.shape:
                    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
                square = to_input_square((mask > 127).astype(np.float32), framing, EVAL_SIDE)
                targets.append(cv2.resize(square, (grid, grid), interpolation=cv2.INTER_AREA))
                boxes.append(np.full(4, np.nan, np.float32))
                evals.append((square > 0.5).astype(np.uint8) if keep_eval[i] else None)
            else:
                b = box_in_input(row.box, framing, w, h)
                targets.append(b.mask(grid, grid).astype(np.float32))
                boxes.append(np.array([b.x0, b.y0, b.x1, b.y1], np.float32))
                evals.append(None)
        x = torch.from_numpy(np.stack(tensors))
        l2, l3, l4, logits = source.maps(x)
        with torch.inference_mode():
            weights = source.cam_weights[logits.argmax(1)]  # [B, 2048]
            cams = torch.einsum("bc,bchw->bhw", weights, l4)
            for key, proj, m in zip(("p2", "p3", "p4"), projections, (l2, l3, l4)):
                chunks[key].append(proj(m).half().numpy())
        chunks["target"].append(np.stack(targets).astype(np.float16))
        chunks["boxes"].append(np.stack(boxes))
        chunks["eval"] += [e if e is not None else np.zeros((0, 0), np.uint8) for e in evals]
        chunks["cams"].append(cams.numpy())
    eval_masks = np.zeros((len(rows), EVAL_SIDE, EVAL_SIDE), np.uint8)
    for i, e in enumerate(chunks["eval"]):
        if e.size:
            eval_masks[i] = e
    return Extracted(*(np.concatenate(chunks[k]) for k in ("p2", "p3", "p4", "target", "boxes")),
                     eval_masks, np.concatenate(chunks["cams"]))


def fit_projections(source: FeatureSource, rows: Sequence[Row], dims: Sequence[int],
                    images: int, seed: int) -> list[Projection]:
    rng = np.random.default_rng(seed)
    pick = [rows[i] for i in rng.choice(len(rows), size=min(images, len(rows)), replace=False)]
    x = torch.from_numpy(np.stack([preprocess_row(r, source.spec) for r in pick]))
    maps = [torch.cat(parts) for parts in zip(*(source.maps(part)[:3] for part in x.split(16)))]
    return [Projection.fit(m, k) for m, k in zip(maps, dims)]


def preprocess_row(row: Row, spec: PreprocessSpec) -> np.ndarray:
    unit, _ = frame(read_gray(row.image), spec)
    return normalise(unit, spec)


def localisation_loss(logits: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mask rows: BCE + soft Dice (on slices with a tumour). Box rows: outside cells to 0, the largest
    cell inside the box of every row and column crossing it to 1."""
    logits = logits[:, 0]
    is_box = ~torch.isnan(boxes[:, 0])
    loss = logits.new_zeros(())
    masks = ~is_box
    if masks.any():
        lg, tg = logits[masks], target[masks]
        loss = loss + F.binary_cross_entropy_with_logits(lg, tg, pos_weight=torch.tensor(3.0))
        has_tumour = tg.sum(dim=(1, 2)) > 0.5
        if has_tumour.any():
            p, t = torch.sigmoid(lg[has_tumour]), tg[has_tumour]
            dice = (2 * (p * t).sum(dim=(1, 2)) + 1) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + 1)
            loss = loss + (1 - dice).mean()
    if is_box.any():
        lg, inside = logits[is_box], target[is_box] > 0.5
        outside = F.binary_cross_entropy_with_logits(lg, torch.zeros_like(lg), reduction="none")
        loss = loss + 0.5 * (outside * ~inside).sum() / (~inside).sum().clamp_min(1)
        masked = lg.masked_fill(~inside, -1e4)
        rows_in, cols_in = inside.any(dim=2), inside.any(dim=1)
        row_max, col_max = masked.amax(dim=2), masked.amax(dim=1)
        projection = torch.cat([row_max[rows_in], col_max[cols_in]])
        if projection.numel():
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(projection, torch.ones_like(projection))
    return loss


def train_decoder(data: Extracted, train: np.ndarray, channels: Sequence[int], width: int, epochs: int,
                  lr: float, batch_size: int, seed: int,
                  val_score: Callable[[TumourDecoder], float] | None = None) -> TumourDecoder:
    """Train on the rows ``train`` of ``data``; with ``val_score`` keep the epoch that scores best."""
    torch.manual_seed(seed)
    decoder = TumourDecoder(channels, width)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train) / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        decoder.train()
        order = rng.permutation(train)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start : start + batch_size])
            p2, p3, p4 = (torch.from_numpy(a[idx]).float() for a in (data.p2, data.p3, data.p4))
            flip = rng.random() < 0.5  # mirror the whole batch: the maps mirror with the image (nearly)
            target, boxes = torch.from_numpy(data.target[idx]).float(), torch.from_numpy(data.boxes[idx])
            if flip:
                p2, p3, p4, target = (t.flip(-1) for t in (p2, p3, p4, target))
            loss = localisation_loss(decoder(p2, p3, p4), target, boxes)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if val_score is None:  # no validation: the last epoch's weights
            log.info("localiser epoch %d: loss %.4f", epoch + 1, total / len(order))
            continue
        decoder.eval()
        score = val_score(decoder)
        log.info("localiser epoch %d: loss %.4f, val score %.4f", epoch + 1, total / len(order), score)
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in decoder.state_dict().items()}
    if best_state is not None:
        decoder.load_state_dict(best_state)
    return decoder.eval()


def predict_maps(decoder: TumourDecoder, data: Extracted, idx: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            i = idx[start : start + batch_size]
            p2, p3, p4 = (torch.from_numpy(a[i]).float() for a in (data.p2, data.p3, data.p4))
            out.append(torch.sigmoid(decoder(p2, p3, p4))[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def upsample(grid: np.ndarray, side: int = EVAL_SIDE) -> np.ndarray:
    return cv2.resize(grid.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    both = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / both) if both else 1.0


def region_box(binary: np.ndarray, min_area: float) -> tuple[float, float, float, float] | None:
    """Bounding box (normalised x0 y0 x1 y1) of the largest connected region, or None when it is
    smaller than ``min_area`` of the square."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = stats[k]
    side = binary.shape[0]
    if area < min_area * side * side:
        return None
    return x / side, y / side, (x + w) / side, (y + h) / side


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pointing(grid: np.ndarray, box: np.ndarray) -> bool:
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    h, w = grid.shape
    return bool(box[0] <= (col + 0.5) / w <= box[2] and box[1] <= (row + 0.5) / h <= box[3])


def mask_figures(maps: np.ndarray, masks: np.ndarray, threshold: float, min_area: float) -> dict:
    """Mean Dice over slices with a tumour; share of tumour-free slices given a region."""
    dices, false_regions, empties = [], 0, 0
    for grid, truth in zip(maps, masks):
        binary = upsample(grid) >= threshold
        if region_box(binary, min_area) is None:
            binary[:] = False
        if truth.any():
            dices.append(dice(binary, truth.astype(bool)))
        else:
            empties += 1
            false_regions += int(binary.any())
    return {"tumour_slices": len(dices), "dice": float(np.mean(dices)) if dices else None,
            "tumour_free_slices": empties,
            "tumour_free_with_region": false_regions / empties if empties else None}


def box_figures(maps: np.ndarray, boxes: np.ndarray, cams: np.ndarray, threshold: float,
                min_area: float) -> dict:
    hits = [pointing(m, b) for m, b in zip(maps, boxes)]
    cam_hits = [pointing(upsample(c, maps.shape[-1]), b) for c, b in zip(cams, boxes)]
    ious = []
    for grid, b in zip(maps, boxes):
        found = region_box(upsample(grid) >= threshold, min_area)
        ious.append(box_iou(found, b) if found else 0.0)
    return {"images": len(hits), "pointing_game": float(np.mean(hits)) if hits else None,
            "cam_pointing_game": float(np.mean(cam_hits)) if cam_hits else None,
            "box_iou": float(np.mean(ious)) if ious else None,
            "box_iou_over_0.5": float(np.mean(np.asarray(ious) >= 0.5)) if ious else None}


def cache_key(identity: bytes, rows: Sequence[Row], spec: PreprocessSpec, dims: Sequence[int],
              decoder: bytes = b"") -> str:
    """``identity``: what identifies the trunk; ``decoder``: a given decoder (its projections made the features)."""
    digest = hashlib.sha256(identity + decoder)
    digest.update(spec.to_json().encode() + json.dumps(list(dims)).encode())
    digest.update("\n".join(f"{r.image}\t{r.split}" for r in rows).encode())
    return digest.hexdigest()


def projection_bytes(state: dict) -> bytes:
    """A decoder state's projections (they alone made the cached features)."""
    weights = state["weights"]
    return b"".join(weights[k].numpy().tobytes() for k in sorted(weights) if k.startswith("projections."))


CACHED = ("p2", "p3", "p4", "target", "boxes", "eval_masks", "cams")


def cached_features(config: FitLocaliserConfig, source: FeatureSource, rows: Sequence[Row], dims: Sequence[int],
                    key: str, given: dict | None, fp16: bool) -> tuple[Extracted, list[Projection]]:
    """The projected features of ``rows``: read from ``config.cache`` when it holds them (same ``key``),
    extracted (and cached) otherwise. Projections: ``given``'s, or fitted on the train rows (rounded to
    float16 when ``fp16``, as the file will store them, so the features are those the graft computes)."""
    cache = config.cache
    if cache is not None and cache.exists() and str(np.load(cache / "key.npy")) == key:
        data = Extracted(*(np.load(cache / f"{k}.npy", mmap_mode="r") for k in CACHED))
        log.info("projected features read from %s", cache)
        return data, list(Localiser.from_state(torch.load(cache / "projections.pt")).projections)
    if given is not None:
        projections = list(Localiser.from_state(given).projections)
    else:
        projections = fit_projections(source, [r for r in rows if r.split == "train"], dims, config.pca_images,
                                      config.seed)
        if fp16:
            from model_export.fp16 import round_to_fp16

            projections = [round_to_fp16(p) for p in projections]
    data = extract(source, rows, projections, config.batch_size,
                   [r.split != "train" and r.mask is not None for r in rows])
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for k in CACHED:
            np.save(cache / f"{k}.npy", getattr(data, k))
        torch.save(Localiser(projections, TumourDecoder(dims, config.width)).state(), cache / "projections.pt")
        np.save(cache / "key.npy", np.array(key))
    return data, projections


def test_figures(decoder: TumourDecoder, data: Extracted, split: np.ndarray, source: np.ndarray,
                 threshold: float, min_area: float) -> dict:
    """Dice per LGG sequence on the test patients; pointing game and box IoU on figshare's test rows."""
    figures = {}
    for seq in ("flair", "t1pre", "t1post"):
        idx = np.flatnonzero((split == "test") & (source == seq))
        if len(idx):
            figures[f"lgg-{seq}"] = mask_figures(predict_maps(decoder, data, idx), data.eval_masks[idx],
                                                 threshold, min_area)
    fig = np.flatnonzero((split == "test") & (source == "figshare"))
    if len(fig):
        figures["figshare"] = box_figures(predict_maps(decoder, data, fig), data.boxes[fig], data.cams[fig],
                                          threshold, min_area)
    return figures


def main(config: FitLocaliserConfig) -> dict:
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    from model_export.data import shared_data_dir

    from_onnx = Path(config.checkpoint).suffix.lower() == ".onnx"
    if not from_onnx and (config.decoder or config.out or config.version or config.save_decoder):
        raise ValueError("--out, --version, --decoder and --save-decoder apply to an .onnx model only")
    ckpt: dict = {}
    source: FeatureSource
    if from_onnx:
        from model_export.graft import OnnxTrunk

        source = OnnxTrunk(config.checkpoint, config.threads)
        identity, fp16 = source.fingerprint, source.fp16
    else:
        ckpt = read_checkpoint(config.checkpoint)
        model, _, spec = model_from_checkpoint(ckpt)
        source = TorchTrunk(model, spec)
        identity, fp16 = Path(config.checkpoint).read_bytes()[-4096:], False  # the tail holds the last tensors
    given = torch.load(config.decoder) if config.decoder else None
    rows = localisation_rows(config.data_dir or shared_data_dir())
    if given is not None:  # nothing to train: the validation and test rows are all it reads
        rows = [r for r in rows if r.split != "train"]
    dims = tuple(given["channels"]) if given else (config.dim2, config.dim3, config.dim4)
    key = cache_key(identity, rows, source.spec, dims, projection_bytes(given) if given else b"")
    data, projections = cached_features(config, source, rows, dims, key, given, fp16)
    split = np.array([r.split for r in rows])
    kind = np.array([r.source for r in rows])
    is_mask = np.isnan(data.boxes[:, 0])
    train = np.flatnonzero(split == "train")
    val_masks = np.flatnonzero((split == "val") & is_mask)

    def val_dice(decoder: TumourDecoder, threshold: float, min_area: float) -> float:
        maps = predict_maps(decoder, data, val_masks)
        return mask_figures(maps, data.eval_masks[val_masks], threshold, min_area)["dice"] or 0.0

    if given is not None:  # a decoder trained on another file's maps: measured here, not retrained
        decoder = Localiser.from_state(given).decoder
        threshold, min_area = float(given["threshold"]), float(given["min_area"])
        best = val_dice(decoder, threshold, min_area)
    else:
        min_area = config.min_area
        decoder = train_decoder(data, train, dims, config.width, config.epochs, config.lr, config.decoder_batch,
                                config.seed, lambda d: val_dice(d, 0.5, min_area))
        if fp16:  # what the file will store
            from model_export.fp16 import round_to_fp16

            round_to_fp16(decoder)
        thresholds = np.round(np.arange(0.2, 0.81, 0.05), 2)
        scores = [val_dice(decoder, float(t), min_area) for t in thresholds]
        threshold, best = float(thresholds[int(np.argmax(scores))]), max(scores)
    log.info("threshold %.2f (val Dice %.4f)", threshold, best)

    report: dict = {"threshold": threshold, "min_area": min_area, "val_dice": best,
                    "test": test_figures(decoder, data, split, kind, threshold, min_area)}
    localiser = Localiser(projections, decoder)
    state = {**localiser.state(), "threshold": threshold, "min_area": min_area, "report": report}
    if from_onnx:
        from model_export.graft import graft_file

        out = Path(config.out or config.checkpoint)
        test_rows = [r for r in rows if r.split == "test"][::97][:8]
        batch = np.stack([preprocess_row(r, source.spec) for r in test_rows])
        report["graft"] = graft_file(config.checkpoint, out, localiser, threshold, min_area, config.version, batch)
        if config.save_decoder:
            config.save_decoder.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, config.save_decoder)
        log.info("tumour_map grafted into %s", out)
    else:
        ckpt["localiser"] = state
        save_checkpoint(config.checkpoint, ckpt)
        log.info("localiser stored in %s", config.checkpoint)
    if config.report:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(json.dumps(report, indent=2))
    log.info("localisation figures: %s", json.dumps(report["test"]))
    return report
