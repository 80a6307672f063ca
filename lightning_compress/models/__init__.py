"""Model zoo (a small CNN, an MLP, LeNet-5, torchvision's ResNets, text classifiers over Hugging Face encoders) and
the LightningModule that trains them."""

from lightning_compress.models.attention import ExplicitMultiheadAttention, explicit_attention
from lightning_compress.models.classifier import ClassificationModule
from lightning_compress.models.cnn import SmallCNN
from lightning_compress.models.lenet import LeNet5
from lightning_compress.models.mlp import MLP
from lightning_compress.models.resnet import RESNET_ARCHITECTURES, resnet
from lightning_compress.models.text import TextClassifier, bert, hugging_face_encoder, minilm, student_from_teacher

__all__ = [
    "MLP",
    "RESNET_ARCHITECTURES",
    "ClassificationModule",
    "ExplicitMultiheadAttention",
    "LeNet5",
    "SmallCNN",
    "TextClassifier",
    "bert",
    "explicit_attention",
    "hugging_face_encoder",
    "minilm",
    "resnet",
    "student_from_teacher",
]
