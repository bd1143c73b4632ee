"""Image quality, measured: what a generator draws, judged in the features of the project's own classifier.

Equivalence tests (ONNX Runtime = PyTorch = Triton, samplers = diffusers) say nothing of whether the images are good;
these figures do. All of them compare N generated images with real Fashion-MNIST:

- agreement: the fraction the classifier assigns to the requested class (conditional models only).
- fd: Frechet distance between Gaussians fitted to the classifier's penultimate features (256-d) of the generated
  images and of the whole real test set (Heusel et al. 2017, "FID", with our classifier instead of Inception, which
  cannot be downloaded here). FD is biased upwards at small N: compare figures at equal N only. `fd_floor` is the
  same distance for N real *training* images, the best a generator can score at this N.
- precision / recall: the k-NN manifold estimate of Kynkaanniemi et al. 2019 (k=3) against N real test images:
  precision is the share of generated images inside the real manifold (fidelity), recall the share of real images
  inside the generated one (variety), so the two failures are separate numbers.
- diversity: mean pairwise feature distance within a class (the requested class; the predicted one for
  unconditional models), as a ratio to the same figure for real test images (1.0 = as varied as real data; a
  collapsed generator scores near 0).
- sharpness: mean variance of the image Laplacian, as a ratio to real images (blurry images score below 1).
- brightness: mean pixel value 0-255 (real test images: ~73); the figure that exposed the DDIM drift.

Metrics are pure numpy functions of feature arrays; the features come from `FeatureNet` (torch).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trident.serving.files import atomic_file, file_sha256

from .checkpoint import load_model

KNN_K = 3  # Kynkaanniemi et al. 2019 use k = 3


# ----------------------------------------------------------------------------------------------------------------
# Metrics (numpy, float64)
# ----------------------------------------------------------------------------------------------------------------

def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Dowson & Landau 1982).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real and >= 0 for PSD
    S1, S2 (S1 S2 is similar to S1^(1/2) S2 S1^(1/2)); numerical noise in them is clipped."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (N, M) between rows of a (N, D) and b (M, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def knn_radii(features: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (N,)."""
    d = pairwise_distances(features, features)
    return np.sort(d, axis=1)[:, k]  # column 0 is the row itself (distance 0)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): a sample is inside a manifold when it lies within
    the k-NN radius of at least one of that set's points. precision = fake inside real, recall = real inside fake."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall need more than k={k} samples in each set, got {len(real)} and {len(fake)}")
    d = pairwise_distances(fake, real)  # (F, R)
    precision = float(np.mean((d <= knn_radii(real, k)[None, :]).any(axis=1)))
    recall = float(np.mean((d <= knn_radii(fake, k)[:, None]).any(axis=0)))
    return precision, recall


def within_class_spread(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise feature distance between two different images of that class
    (classes with fewer than two images are skipped)."""
    values = []
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) < 2:
            continue
        d = pairwise_distances(f, f)
        values.append(d[np.triu_indices(len(f), 1)].mean())
    if not values:
        raise ValueError("within-class spread needs two images of at least one class")
    return float(np.mean(values))


def laplacian_variance(images: np.ndarray) -> float:
    """Mean over images of the variance of the 4-neighbour Laplacian of the image in [0, 1] (a focus measure:
    blur lowers it). images: float (N, C, H, W) in [-1, 1]."""
    x = (np.asarray(images, np.float64) + 1.0) / 2.0
    lap = (x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:] - 4.0 * x[..., 1:-1, 1:-1])
    return float(lap.reshape(len(x), -1).var(axis=1).mean())


def brightness(images: np.ndarray) -> float:
    """Mean pixel value on the 0-255 scale of images in [-1, 1]."""
    return float((np.clip(np.asarray(images, np.float64), -1, 1).mean() + 1.0) * 127.5)


# ----------------------------------------------------------------------------------------------------------------
# Features from the project's classifier
# ----------------------------------------------------------------------------------------------------------------

class FeatureNet:
    """The shipped Fashion-MNIST classifier as a feature extractor: penultimate activations (after the 256-unit
    hidden layer and its ReLU) and logits, for images in [-1, 1] (N, 1, 28, 28)."""

    def __init__(self, classifier_ckpt):
        model, meta = load_model(classifier_ckpt, "classifier")
        self.model = model.eval()
        self.digest = file_sha256(classifier_ckpt)
        self.test_accuracy = meta.get("test_accuracy")
        layers = list(self.model.net)
        self.body, self.head = torch.nn.Sequential(*layers[:-2]), layers[-1]  # drop [Dropout, Linear(256 -> k)]
        self.dim = self.head.in_features

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        feats, logits = [], []
        for i in range(0, len(x), batch):
            f = self.body(x[i:i + batch])
            feats.append(f)
            logits.append(self.head(f))
        return torch.cat(feats).double().numpy(), torch.cat(logits).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Real reference and the evaluation of one set of generated images
# ----------------------------------------------------------------------------------------------------------------

def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n items with classes in equal shares (as far as n allows), drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    idx = []
    for c, m in zip(classes, per):
        pool = np.flatnonzero(labels == c)
        if m > len(pool):
            raise ValueError(f"class {c} has {len(pool)} images, {m} needed")
        idx.append(rng.choice(pool, m, replace=False))
    return np.sort(np.concatenate(idx))


@dataclass
class RealReference:
    """Real Fashion-MNIST in the feature space of a FeatureNet: the test set's moments (the FD target), and the
    images and features from which equal-N real subsets are drawn."""

    net: FeatureNet
    test_images: np.ndarray       # float32 (N, 1, 28, 28) in [-1, 1]
    test_labels: np.ndarray
    test_features: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def build(cls, net: FeatureNet, data_dir=None, *, test_limit: int | None = None, train_limit: int = 20000,
              cache_dir=None) -> "RealReference":
        """Load real images and compute the test set's features (cached in cache_dir, keyed by the classifier's
        and the images' bytes: ~1.5 min of CPU for 10,000 images otherwise)."""
        from .data import load_fashion_mnist

        def load(split, limit=None):
            d = load_fashion_mnist(split, data_dir, limit=limit)
            return d.images.astype(np.float32)[:, None] / 127.5 - 1.0, d.labels.astype(np.int64)

        test_x, test_y = load("test", test_limit)
        train_x, train_y = load("train", train_limit)
        feats = None
        if cache_dir is not None:
            key = hashlib.sha256(net.digest.encode() + test_x.tobytes()).hexdigest()[:16]
            path = Path(cache_dir) / f"real-test-features-{key}.npy"
            if path.is_file():
                feats = np.load(path).astype(np.float64)
        if feats is None:
            feats = net(test_x)[0].astype(np.float32).astype(np.float64)  # as the cache stores them
            if cache_dir is not None:
                with atomic_file(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, feats.astype(np.float32))
        mu, sigma = moments(feats)
        return cls(net, test_x, test_y, feats, train_x, train_y, mu, sigma)

    def floor(self, n: int, seed: int = 0) -> float:
        """FD of n real training images (classes balanced) against the test set: the best score at this n."""
        f, _ = self.net(self.train_images[balanced_subset(self.train_labels, n, seed)])
        return frechet_distance(*moments(f), self.mu, self.sigma)

    def real_scores(self, n: int, seed: int = 0) -> dict:
        """Every figure of evaluate_images for n real training images (classes balanced) with their true labels:
        what a perfect generator scores at this n (its fd is floor(n, seed))."""
        i = balanced_subset(self.train_labels, n, seed)
        return evaluate_images(self.train_images[i], self, self.train_labels[i], seed)

    def subset(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n real test images (classes balanced): images, labels, features."""
        i = balanced_subset(self.test_labels, n, seed)
        return self.test_images[i], self.test_labels[i], self.test_features[i]


def evaluate_images(images: np.ndarray, ref: RealReference, labels: np.ndarray | None = None,
                    seed: int = 0) -> dict:
    """Every figure of this module for generated images (N, 1, 28, 28) in [-1, 1]; labels are the requested classes
    (None for unconditional models). Real-data comparisons use N real test images with the same class shares."""
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    if n <= KNN_K:
        raise ValueError(f"need more than {KNN_K} images, got {n}")
    if not np.isfinite(images).all():
        raise ValueError("generated images contain NaN or Inf")
    feats, logits = ref.net(images)
    pred = logits.argmax(1)
    real_x, real_y, real_f = ref.subset(n, seed)
    precision, recall = precision_recall(real_f, feats)
    groups = pred if labels is None else np.asarray(labels)
    result = {
        "n": n,
        "fd": frechet_distance(*moments(feats), ref.mu, ref.sigma),
        "precision": precision,
        "recall": recall,
        "diversity": within_class_spread(feats, groups) / within_class_spread(real_f, real_y),
        "sharpness": laplacian_variance(images) / laplacian_variance(real_x),
        "brightness": brightness(images),
        "real_brightness": brightness(real_x),
    }
    if labels is not None:
        labels = np.asarray(labels)
        result["agreement"] = float(np.mean(pred == labels))
        result["per_class_agreement"] = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    for k, v in list(result.items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{k} is not finite ({v})")
    return result
