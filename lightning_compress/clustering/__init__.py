"""Weight clustering: k-means labels and the shared-weight update (plain PyTorch) and the ``WeightClustering`` callback."""

from lightning_compress.clustering.callback import WeightClustering
from lightning_compress.clustering.kmeans import INITS, KEPT_ZERO, SharedWeights, kmeans_labels

__all__ = ["INITS", "KEPT_ZERO", "SharedWeights", "WeightClustering", "kmeans_labels"]
