"""The out-of-distribution score that travels inside the model: class-conditional Mahalanobis
distance of the pooled layer4 features (Lee et al., NeurIPS 2018), with a shared within-class
covariance, computed in the ONNX graph as the extra output ``ood_score``.

Fit (numpy, no torch): pooled features of the training images (no augmentation) -> class means and
the within-class covariance -> its leading ``components`` eigenvectors, whitened; the score of a
feature vector is the smallest squared distance to a class mean in that whitened space (what is far
from every class is not a slice the model knows). Calibrate: the threshold is a high quantile of
the validation split's scores, so a known share of in-distribution slices is flagged; how well it
separates non-brain images is measured, never tuned, on ``model_export.nonbrain``.

Why in the graph: the service then needs only a number and a threshold (the score costs one
2048 x k matrix product, nothing beside the 4 GMAC of the network), GPUs compute it with the rest,
and older models simply lack the output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Principal directions kept. Chosen for 1.2.0 on half of the non-brain set (every other image; the
# other half reported apart): 256 flagged 84% of that half, 512 90%, 768 95%, 1024 and more 97%, all
# at the same 0.5% of validation slices flagged. The low-variance directions are where photos, CT
# and other anatomy leave the brain slices' feature distribution.
DEFAULT_COMPONENTS = 1024
DEFAULT_QUANTILE = 0.995  # share of validation slices kept in distribution
SHRINKAGE = 1e-3  # ridge on the covariance, relative to its mean eigenvalue


@dataclass
class OodFit:
    mean: np.ndarray  # [D] subtracted before projection
    projection: np.ndarray  # [D, k] eigenvectors / sqrt(eigenvalue): whitening of the within-class covariance
    class_means: np.ndarray  # [C, k] class means, projected
    threshold: float = float("inf")
    calibration: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        """Plain arrays and numbers, for a checkpoint."""
        return {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_state(cls, state: dict) -> OodFit:
        return cls(mean=np.asarray(state["mean"], np.float32), projection=np.asarray(state["projection"], np.float32),
                   class_means=np.asarray(state["class_means"], np.float32), threshold=float(state["threshold"]),
                   calibration=dict(state.get("calibration", {})))


def fit(features: np.ndarray, targets: np.ndarray, components: int = DEFAULT_COMPONENTS) -> OodFit:
    """``features`` [N, D] pooled layer4 features, ``targets`` [N] class indices."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = centred.T @ centred / max(len(x) - len(classes), 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][: min(components, x.shape[1])]
    ridge = SHRINKAGE * float(eigenvalues.mean())
    projection = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + ridge)
    mean = x.mean(axis=0)
    class_means = (means - mean) @ projection
    return OodFit(mean=mean.astype(np.float32), projection=projection.astype(np.float32),
                  class_means=class_means.astype(np.float32),
                  calibration={"components": int(projection.shape[1]), "fit_images": len(x)})


def score(model: OodFit, features: np.ndarray) -> np.ndarray:
    """[N] smallest squared whitened distance to a class mean (the graph computes the same)."""
    z = (np.asarray(features, dtype=np.float32) - model.mean) @ model.projection
    d = ((z[:, None, :] - model.class_means[None, :, :]) ** 2).sum(axis=2)
    return d.min(axis=1)


def calibrate(model: OodFit, val_features: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> OodFit:
    """Set the threshold at the ``quantile`` of the validation scores."""
    scores = score(model, val_features)
    model.threshold = float(np.quantile(scores, quantile))
    model.calibration.update({"quantile": quantile, "val_images": len(scores),
                              "val_flagged": float((scores > model.threshold).mean())})
    return model


def flagged(model: OodFit, features: np.ndarray) -> np.ndarray:
    return score(model, features) > model.threshold
