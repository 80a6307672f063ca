"""``DistillationModule``: a student trained against a frozen teacher, min_θ L(y, f(x; θ)) + λ·D(f(x; θ), f(x; θ*))."""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_compress.batches import (
    UNLABELED,
    Batch,
    ModelInputs,
    batch_targets,
    call_model,
    first_training_input,
    input_tensors,
    map_inputs,
    model_inputs,
    output_logits,
    placed_like,
)
from lightning_compress.distillation.layers import EncoderRecorder, checked_layer_map, encoder_of
from lightning_compress.distillation.losses import (
    attention_loss,
    attention_map_loss,
    dkd_loss,
    hidden_state_loss,
    hint_loss,
    kd_loss,
)
from lightning_compress.models.classifier import (
    ClassificationModule,
    OptimizerFactory,
    SchedulerFactory,
    example_input,
    labelled_cross_entropy,
)
from lightning_compress.modules import eval_mode
from lightning_compress.safe_loading import load_weights

LOGIT_LOSSES = ("kd", "dkd")


class DistillationModule(ClassificationModule):
    """Train ``student`` with cross-entropy and a distance to a frozen ``teacher``'s outputs.

    The loss is ``ce_weight · CE(y, student(x)) + kd_weight · distillation_loss(...)`` plus, with
    ``hints``, ``hint_weight`` · FitNets and ``attention_weight`` · attention transfer on the named
    feature pairs, and with ``layer_map`` the layer losses of transformers (TinyBERT, MiniLM):
    ``hint_weight`` · the MSE between the hidden states of each pair of layers (the student's through a
    learned linear map where the widths differ; padding left out) and ``attention_weight`` · the KL
    between their attention distributions. ``distillation_loss`` is KD (``logit_loss="kd"``, KL at
    ``temperature``, times T²) or decoupled KD (``"dkd"``); subclasses override it to change the
    distance, and may override ``training_step`` / ``configure_optimizers`` as in any LightningModule.
    Batches are ``(inputs, targets)`` or dicts in Hugging Face's convention (``input_ids``,
    ``attention_mask``, ``labels``), as for :class:`ClassificationModule`; student and teacher may return their
    logits or a Hugging Face ``ModelOutput`` (``AutoModelForSequenceClassification`` as it comes). Samples whose target is
    :data:`~lightning_compress.batches.UNLABELED` (-100) are left out of the cross-entropy and learnt from the
    teacher alone (DKD takes the teacher's top class as their target): unlabeled data of the task's domain,
    Hinton et al.'s transfer set, is where a teacher has the most to teach.

    The teacher is never trained and never saved: it is held outside the module tree, so it is in no
    ``state_dict``, no optimizer, no ``modules()`` walk (``Pruning`` and ``QuantizationAwareTraining``
    act on the student, and DDP needs no ``find_unused_parameters``), and ``.train()`` on the wrapper
    leaves it in eval mode; its forward runs under ``torch.no_grad()``, in the teacher's own dtype (Lightning's
    ``precision="bf16-true"`` converts the student alone: a float32 teacher takes the inputs in float32).
    Validation and test measure the student alone. A checkpoint loads back with
    ``DistillationModule.load_from_checkpoint(path, student=..., teacher=...)``; ``module.student`` (also
    ``module.model``) is the student as a plain model.

    Args:
        student: the model to train (stored as ``model``, like ``ClassificationModule``).
        teacher: an ``nn.Module``, or the path of a ``ClassificationModule`` checkpoint whose weights are
            loaded into ``teacher_model``.
        hints: ``[(student module path, teacher module path), ...]``; a learned 1x1 convolution (or
            linear layer) adapts the student's features where the channel counts differ.
        layer_map: ``{student layer: teacher layer}`` for a student and a teacher over Hugging Face encoders
            (:class:`~lightning_compress.models.TextClassifier`), numbered as Hugging Face numbers
            ``hidden_states``: 0 is the embeddings' output, i in 1..n transformer layer i's. The attention maps
            of the pairs of transformer layers (both from 1) are compared; for them, ``attention_weight`` > 0
            switches both encoders to eager attention, the one that returns its maps. A layer that does not
            exist is refused here.
        input_shape: one input's shape, used to check that student and teacher outputs have the same shape
            before training and, with ``hints``, to size the adapters (without it they are sized on the
            first training batch of the fit, at setup).
        cache_teacher: keep the teacher's logits per input, so epochs after the first skip its forward
            (for training data without augmentation; not with ``hints`` or ``layer_map``).
        input_dtype: the dtype of ``input_shape``'s inputs: ``"int64"`` for token ids.

    Example:
        >>> from lightning_compress.models import SmallCNN
        >>> teacher = SmallCNN(num_classes=10, image_size=8, channels=(32, 64))
        >>> student = SmallCNN(num_classes=10, image_size=8, channels=(8, 16), hidden=32)
        >>> module = DistillationModule(student, teacher, num_classes=10, temperature=4.0, input_shape=(1, 8, 8))
        >>> sorted({name.split(".")[0] for name in module.state_dict()})   # the student, not the teacher
        ['model']

        A 1-layer BERT student of a 2-layer teacher, its layer 1 (and embeddings) against the teacher's 2 (and 0):

        >>> from lightning_compress.models import bert
        >>> tiny = {"vocab_size": 30, "num_attention_heads": 2, "intermediate_size": 32}
        >>> teacher = bert(3, hidden_size=16, num_hidden_layers=2, **tiny)
        >>> student = bert(3, hidden_size=8, num_hidden_layers=1, **tiny)
        >>> module = DistillationModule(student, teacher, num_classes=3, layer_map={0: 0, 1: 2}, attention_weight=1.0)
        >>> module.layer_adapters   # 8 student features mapped to the teacher's 16, for each pair
        ModuleList(
          (0-1): 2 x Linear(in_features=8, out_features=16, bias=False)
        )
    """

    # Layers that exist only for training; compression callbacks leave them out.
    compression_exclude = ("adapters.*", "layer_adapters.*")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | os.PathLike[str],
        num_classes: int,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        temperature: float = 4.0,
        logit_loss: str = "kd",
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        hints: Sequence[tuple[str, str]] | None = None,
        layer_map: Mapping[int, int] | None = None,
        hint_weight: float = 1.0,
        attention_weight: float = 0.0,
        teacher_model: nn.Module | None = None,
        cache_teacher: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        input_shape: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
        input_dtype: str = "float32",
    ) -> None:
        weights = {
            "ce_weight": ce_weight,
            "kd_weight": kd_weight,
            "hint_weight": hint_weight,
            "attention_weight": attention_weight,
        }
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"unknown logit_loss {logit_loss!r}; use one of {', '.join(LOGIT_LOSSES)}")
        if cache_teacher and (hints or layer_map):
            raise ValueError(
                "cache_teacher keeps the teacher's logits only; hints and layer_map need its features at every step"
            )
        super().__init__(student, num_classes, optimizer, scheduler, input_shape, label_smoothing, input_dtype)
        self.save_hyperparameters(
            "num_classes", "input_shape", "label_smoothing", "input_dtype", "ce_weight", "kd_weight", "temperature",
            "logit_loss", "dkd_alpha", "dkd_beta", "hints", "layer_map", "hint_weight", "attention_weight",
            "cache_teacher", logger=False,
        )  # fmt: skip
        self.ce_weight, self.kd_weight, self.hint_weight, self.attention_weight = (
            ce_weight,
            kd_weight,
            hint_weight,
            attention_weight,
        )
        self.temperature = temperature
        self.logit_loss = logit_loss
        self.dkd_alpha, self.dkd_beta = dkd_alpha, dkd_beta
        self._cache: dict[bytes, torch.Tensor] | None = {} if cache_teacher else None
        self._frozen = (_frozen_teacher(teacher, teacher_model),)  # a tuple: outside the module tree
        self.hints = [(str(student_path), str(teacher_path)) for student_path, teacher_path in hints or []]
        self._features: dict[str, list[torch.Tensor | None]] = {
            "student": [None] * len(self.hints),
            "teacher": [None] * len(self.hints),
        }
        self._hook_features()
        self.adapters = nn.ModuleList()
        self._pair_layers(layer_map)
        self._outputs_checked = False
        if input_shape is not None:
            self._check_and_build_adapters(torch.cat([self.example_input_array] * 2))

    def setup(self, stage: str) -> None:
        """Without ``input_shape``, size the hints' adapters on the first training batch of the fit, before the
        optimizers are built; the shape goes into ``hparams``, so a checkpoint loads back with its adapters."""
        if stage != "fit" or not self.hints or len(self.adapters):
            return
        example = first_training_input(self.trainer)
        if not isinstance(example, torch.Tensor):
            raise ValueError(
                "hints size their adapters on one input tensor, whose shape the checkpoint keeps: give input_shape "
                f"(and input_dtype), as the first training batch {'is not one tensor' if example else 'is not known'}"
            )
        self.hparams["input_shape"] = [int(size) for size in example.shape[1:]]
        self.hparams["input_dtype"] = str(example.dtype).removeprefix("torch.")
        self.example_input_array = example_input(self.hparams["input_shape"], example.dtype)
        self._check_and_build_adapters(example[:2].to(self.device))

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule: see the class docstring)."""
        return self._frozen[0]

    @property
    def student(self) -> nn.Module:
        """The model in training, the ``student`` given: ``model`` under the name distillation gives it."""
        return self.model

    def distillation_loss(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """The distance between student and teacher outputs, weighted by ``kd_weight`` in the total loss."""
        if self.logit_loss == "dkd":
            targets = batch_targets(batch)
            targets = torch.where(targets == UNLABELED, teacher_output.argmax(dim=-1), targets)
            return dkd_loss(student_output, teacher_output, targets, self.temperature, self.dkd_alpha, self.dkd_beta)
        return kd_loss(student_output, teacher_output, self.temperature)

    def teacher_output(self, inputs: ModelInputs) -> torch.Tensor:
        """The teacher's logits for ``inputs``, without gradients, in eval mode, on the inputs' device.

        ``inputs`` is one tensor or, from a dict batch, tensors by keyword. With ``cache_teacher``, logits
        are kept per input (keyed by a digest of its values, every tensor's) and the teacher runs only on
        inputs it has not seen: after the first epoch, on none, when the training data is not augmented.
        In eval mode each sample's logits do not depend on the rest of its batch.
        """
        if self._cache is None:
            return self._run_teacher(inputs)
        keys = _digests(inputs)
        missing = [index for index, key in enumerate(keys) if key not in self._cache]
        if missing:
            unseen = self._run_teacher(map_inputs(inputs, lambda tensor: tensor[missing])).cpu()
            for index, logits in zip(missing, unseen, strict=True):
                self._cache[keys[index]] = logits
        return torch.stack([self._cache[key] for key in keys]).to(input_tensors(inputs)[0].device)

    def _run_teacher(self, inputs: ModelInputs) -> torch.Tensor:
        teacher, device = self.teacher, input_tensors(inputs)[0].device
        first = next(teacher.parameters(), None)
        if first is not None and first.device != device:
            teacher.to(device)
        if first is not None:  # a student in bfloat16 (precision="bf16-true") has its inputs in it; the teacher its own
            inputs = placed_like(inputs, device, first.dtype)
        teacher.eval()
        with torch.no_grad():
            return output_logits(call_model(teacher, inputs))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = model_inputs(batch), batch_targets(batch)
        with self._recording():
            student_output = call_model(self, inputs)
            teacher_output = self.teacher_output(inputs)
        if not self._outputs_checked:
            _check_same_shape(student_output, teacher_output)
            self._outputs_checked = True
        task = labelled_cross_entropy(student_output, targets, self.label_smoothing)
        distill = self.distillation_loss(student_output, teacher_output, batch)
        loss = self.ce_weight * task + self.kd_weight * distill + self._feature_loss() + self._layer_loss()
        self.train_accuracy(student_output, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/ce", task, on_step=False, on_epoch=True)
        self.log("train/distill", distill, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _feature_loss(self) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for adapter, student, teacher in zip(
            self.adapters, self._features["student"], self._features["teacher"], strict=True
        ):
            if self.hint_weight:
                total = total + self.hint_weight * hint_loss(adapter(student), teacher)
            if self.attention_weight:
                total = total + self.attention_weight * attention_loss(student, teacher)
        return total

    def _pair_layers(self, layer_map: Mapping[int, int] | None) -> None:
        """Check ``layer_map`` against the encoders' layers, record their states, and make one adapter a pair."""
        self.layer_map: dict[int, int] = {}
        self.layer_adapters = nn.ModuleList()
        self._recorders: tuple[EncoderRecorder, EncoderRecorder] | None = None
        if not layer_map:
            return
        encoders = encoder_of(self.model, "student"), encoder_of(self.teacher, "teacher")
        self.layer_map = checked_layer_map(layer_map, *(encoder.config.num_hidden_layers for encoder in encoders))
        self.hparams["layer_map"] = dict(self.layer_map)  # plain ints: the checkpoint loads with weights_only
        attentions = self.attention_weight > 0
        if attentions and not self.hints and not self._attention_pairs:
            raise ValueError(
                f"attention_weight={self.attention_weight} compares attention maps, but layer_map={self.layer_map} "
                "pairs no transformer layers (1..n; the embeddings, layer 0, have none)"
            )
        self._recorders = (
            EncoderRecorder(encoders[0], "student", attentions),
            EncoderRecorder(encoders[1], "teacher", attentions),
        )
        student_width, teacher_width = (recorder.width for recorder in self._recorders)
        for _ in self.layer_map:
            self.layer_adapters.append(
                nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
            )

    @property
    def _attention_pairs(self) -> list[tuple[int, int]]:
        """The pairs of ``layer_map`` whose attention maps are compared: transformer layers, both from 1."""
        return [(student, teacher) for student, teacher in self.layer_map.items() if student and teacher]

    @contextmanager
    def _recording(self) -> Iterator[None]:
        """Record the encoders' hidden states (and attention maps) for ``layer_map`` in this block."""
        with ExitStack() as stack:
            for recorder in self._recorders or ():
                stack.enter_context(recorder.recording())
            yield

    def _layer_loss(self) -> torch.Tensor | float:
        """``hint_weight`` · the hidden-state losses and ``attention_weight`` · the attention-map losses of the
        ``layer_map``'s pairs, in the recorded forwards; each sum is logged (``train/hidden``, ``train/attention``)."""
        if self._recorders is None:
            return 0.0
        student, teacher = (recorder.take() for recorder in self._recorders)
        total: torch.Tensor | float = 0.0
        if self.hint_weight:
            hidden = sum(
                hidden_state_loss(adapter(student.hidden_states[s]), teacher.hidden_states[t], student.mask)
                for adapter, (s, t) in zip(self.layer_adapters, self.layer_map.items(), strict=True)
            )
            self.log("train/hidden", hidden, on_step=False, on_epoch=True)
            total = total + self.hint_weight * hidden
        if self.attention_weight and self._attention_pairs:
            attention = sum(
                attention_map_loss(student.attentions[s - 1], teacher.attentions[t - 1], student.mask)
                for s, t in self._attention_pairs
            )
            self.log("train/attention", attention, on_step=False, on_epoch=True)
            total = total + self.attention_weight * attention
        return total

    def _hook_features(self) -> None:
        for side, model in (("student", self.model), ("teacher", self.teacher)):
            modules = dict(model.named_modules())
            for index, pair in enumerate(self.hints):
                path = pair[0] if side == "student" else pair[1]
                if path not in modules:
                    near = difflib.get_close_matches(path, [name for name in modules if name], n=5, cutoff=0.4)
                    raise ValueError(f"hint {pair}: the {side} has no module {path!r}; near names: {near}")
                modules[path].register_forward_hook(self._recorder(side, index))

    def _recorder(self, side: str, index: int) -> Any:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._features[side][index] = output

        return record

    def _check_and_build_adapters(self, example: torch.Tensor) -> None:
        """Check output shapes on ``example`` and size one adapter per hint from the features it produces."""
        with torch.no_grad():
            with eval_mode(self.model):
                student_output = output_logits(self.model(example))
            teacher_output = self._run_teacher(example)
        _check_same_shape(student_output, teacher_output)
        self._outputs_checked = True
        for pair, student, teacher in zip(
            self.hints, self._features["student"], self._features["teacher"], strict=True
        ):
            self.adapters.append(_adapter(pair, student, teacher))


def _frozen_teacher(teacher: nn.Module | str | os.PathLike[str], teacher_model: nn.Module | None) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        if teacher_model is None:
            raise ValueError(
                f"teacher={str(teacher)!r} is a checkpoint path: pass teacher_model=, the architecture to load it into"
            )
        checkpoint = load_weights(teacher, f"teacher={str(teacher)!r}")
        weights = {
            key.removeprefix("model."): value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith("model.")
        }
        teacher_model.load_state_dict(weights, strict=True)
        teacher = teacher_model
    return teacher.requires_grad_(False).eval()


def _check_same_shape(student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
    if student_output.shape != teacher_output.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
        )


def _adapter(pair: tuple[str, str], student: torch.Tensor | None, teacher: torch.Tensor | None) -> nn.Module:
    """Identity where the feature shapes agree, else a learned 1x1 convolution or linear map of the channels."""
    if student is None or teacher is None:
        raise ValueError(f"hint {pair}: a module did not run in the forward pass")
    if student.shape == teacher.shape:
        return nn.Identity()
    if student.dim() == teacher.dim() == 4 and student.shape[2:] == teacher.shape[2:]:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False)
    if student.dim() == teacher.dim() == 2:
        return nn.Linear(student.shape[1], teacher.shape[1], bias=False)
    raise ValueError(
        f"hint {pair}: features of shapes {tuple(student.shape)} and {tuple(teacher.shape)} need equal spatial sizes"
    )


def _digests(inputs: ModelInputs) -> list[bytes]:
    """One digest per sample of its values: of every tensor's, for inputs by keyword (token ids and mask)."""
    digests = []
    for sample in zip(*(tensor.detach().cpu() for tensor in input_tensors(inputs))):
        digest = hashlib.blake2b(digest_size=16)
        for values in sample:
            digest.update(values.numpy().tobytes())
        digests.append(digest.digest())
    return digests
