from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress.deploy import compressed_bytes, export, load_compressed
from lightning_compress.deploy.compressed import HEADER_BYTES, MAGIC, most_payload_bytes
from lightning_compress.quantization import QuantConfig, quantize_model, quantized_layers, set_quantization

INPUT = (3, 8, 8)
WEIGHTS = ("0.weight", "4.weight", "6.weight")  # of small_cnn's Conv2d and Linear layers


def small_cnn(hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def torch_save_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def payload_of(data: bytes) -> bytes:
    """The payload of a compressed file (its manifest's line and its blobs), checked against its header."""
    assert data.startswith(MAGIC)
    header, _, body = data[len(MAGIC) :].partition(b"\n")
    codec, length, digest = header.split(b" ")
    payload = lzma.decompress(body) if codec == b"xz" else body
    assert len(payload) == int(length) and hashlib.sha256(payload).hexdigest() == digest.decode()
    return payload


def with_header(first_line: bytes, payload: bytes) -> bytes:
    """A file of ``payload`` stored without xz: with its length and checksum, or only the codec before version 3."""
    if first_line != MAGIC:
        return first_line + b"none\n" + payload
    return first_line + b"none %d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode()) + payload


def manifest_of(data: bytes) -> tuple[dict, int]:
    """The manifest of a compressed file, and its length in bytes."""
    line = payload_of(data).partition(b"\n")[0]
    return json.loads(line), len(line)


def entries(data: bytes) -> dict[str, dict]:
    return {entry["name"]: entry for entry in manifest_of(data)[0]["tensors"]}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (a float compared as the integer of its size)."""
    views = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(views[a.element_size()]), b.reshape(-1).view(views[b.element_size()]))
    )


def prune(model: nn.Module, keep: float) -> None:
    """Zero all but about ``keep`` of each weight, by a random mask multiplied in (negative weights become -0.0)."""
    with torch.no_grad():
        for layer in weight_layers(model):
            layer.weight.mul_(torch.rand_like(layer.weight) < keep)


def test_a_90_percent_sparse_model_round_trips_exactly_in_an_eighth_of_torch_save(tmp_path) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    model(torch.randn(16, *INPUT))  # BatchNorm statistics and num_batches_tracked (int64)
    prune(model, keep=0.1)
    path = export(model.eval(), tmp_path / "model.lcz", torch.zeros(1, *INPUT), format="compressed")
    loaded = load_compressed(small_cnn(), path).state_dict()
    original = model.state_dict()
    assert list(loaded) == list(original)
    # every tensor equal, dtype and shape included, with the bits of every element (a -0.0 comes back as 0.0)
    assert all(
        same_bits(loaded[name], torch.where(tensor == 0, torch.zeros_like(tensor), tensor))
        for name, tensor in original.items()
    )
    assert any(
        bool(torch.signbit(layer.weight[layer.weight == 0]).any()) for layer in weight_layers(model)
    )  # there were -0.0s

    data = path.read_bytes()
    _, manifest_bytes = manifest_of(data)
    weights = [layer.weight for layer in weight_layers(model)]
    nonzeros, elements = sum(int(w.count_nonzero()) for w in weights), sum(w.numel() for w in weights)
    others = sum(t.numel() * t.element_size() for name, t in original.items() if name not in WEIGHTS)
    # float32 values of the non-zeros and at most a bitmask (1 bit per weight) for their positions; the rest as it is
    bound = 4 * nonzeros + math.ceil(elements / 8) * len(weights) + others + manifest_bytes + len(MAGIC) + HEADER_BYTES
    assert len(data) <= bound
    assert all(entries(data)[name]["positions"]["kind"] in ("bitmask", "gaps") for name in WEIGHTS)
    # torch.save holds 4 bytes a weight; here 0.1 * 4 bytes of values and, at their entropy H(0.1) = 0.47 bits, 0.06 bytes
    # of positions: 0.115 of it (0.13 with a plain bitmask), less what xz finds in the floats' exponents, more the rest
    ratio = len(data) / torch_save_bytes(model)
    assert ratio < 0.125, ratio  # measured 0.112


def test_weights_of_16_distinct_values_take_4_bits_each(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(128, 128)
    codebook = torch.randn(16)
    with torch.no_grad():
        model.weight.copy_(
            codebook[torch.randint(0, 16, model.weight.shape)]
        )  # uniform indices: 4 bits of entropy each
    data = compressed_bytes(model)
    entry = entries(data)["weight"]
    assert (
        entry["positions"] == {"kind": "all"} and entry["values"]["kind"] == "codebook" and entry["values"]["bits"] == 4
    )
    weight_bytes = model.weight.numel() * 4 // 8  # 8192
    rest = (
        16 * 4 + model.bias.numel() * 4 + manifest_of(data)[1] + len(MAGIC) + HEADER_BYTES
    )  # the codebook, the float32 bias
    assert 0.97 * weight_bytes <= len(data) <= weight_bytes + rest, len(data)
    fresh = nn.Linear(128, 128)
    load_compressed(fresh, export(model, tmp_path / "m.lcz", torch.zeros(1, 128), format="compressed"))
    assert same_bits(fresh.weight, model.weight) and same_bits(fresh.bias, model.bias)


def rewritten(data: bytes, edit, first_line: bytes = MAGIC) -> bytes:
    """A compressed file with its manifest changed by ``edit`` (in place), stored without xz, its checksum anew."""
    line, _, blobs = payload_of(data).partition(b"\n")
    manifest = json.loads(line)
    edit(manifest)
    return with_header(first_line, json.dumps(manifest).encode() + b"\n" + blobs)


def test_skewed_gaps_and_indices_are_stored_by_lzma_in_fewer_bytes_than_their_width_and_load_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(784, 300)
    with torch.no_grad():  # the 5% largest of Laplace weights, on 8 values: 2.4 bits of entropy, most near zero
        weight = torch.distributions.Laplace(0.0, 1.0).sample(model.weight.shape)
        threshold = weight.abs().reshape(-1).kthvalue(int(0.95 * weight.numel())).values
        level = torch.floor(weight.abs() - threshold).clamp(max=3) + 1
        model.weight.copy_(torch.where(weight.abs() > threshold, weight.sign() * level, 0.0))
    data = compressed_bytes(model)
    entry = entries(data)["weight"]
    stored = int(model.weight.count_nonzero())
    assert entry["values"]["kind"] == "codebook" and entry["values"]["bits"] == 3
    assert entry["positions"]["packing"] == entry["values"]["packing"] == "lzma"
    values, positions = entry["values"]["blob"][1], entry["positions"]["blob"][1]
    gaps = torch.diff(torch.nonzero(model.weight.reshape(-1)).reshape(-1), prepend=torch.tensor([-1])) - 1
    packed_gaps = min(bits * int((gaps // (2**bits - 1) + 1).sum()) / 8 for bits in range(1, 12))
    assert values < 0.9 * stored * 3 / 8 and positions < 0.95 * packed_gaps  # than 3-bit indices, the best gap width
    path = tmp_path / "m.lcz"
    path.write_bytes(data)
    fresh = load_compressed(nn.Linear(784, 300), path)
    assert same_bits(fresh.weight, model.weight) and same_bits(fresh.bias, model.bias)

    def more_gaps(manifest: dict) -> None:
        manifest["tensors"][0]["positions"]["count"] += 1

    def wider(manifest: dict) -> None:
        manifest["tensors"][0]["values"]["bits"] = 9

    for edit, reason in [
        (more_gaps, r"does not hold exactly \d+ values"),
        (wider, "bits=9: an int from 0 to 8 is allowed"),
    ]:
        path.write_bytes(rewritten(data, edit))
        with pytest.raises(ValueError, match=f"tensor 'weight' cannot be read: ValueError: .*{reason}"):
            load_compressed(nn.Linear(784, 300), path)


@pytest.mark.parametrize("version", [1, 2])
def test_a_file_of_an_earlier_version_loads(tmp_path, version: int) -> None:
    """Version 1 packed bits only; version 2 had no length and checksum in its header."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    data = compressed_bytes(model)
    assert "packing" not in json.dumps(manifest_of(data)[0])  # bit packing only: what version 1 wrote
    path = tmp_path / "earlier.lcz"
    first_line = b"lightning_compress.compressed/%d\n" % version
    path.write_bytes(rewritten(data, lambda manifest: None, first_line=first_line))
    fresh = load_compressed(nn.Linear(16, 4), path)
    assert same_bits(fresh.weight, model.weight) and same_bits(fresh.bias, model.bias)


@pytest.mark.parametrize(
    "config, keep",
    [
        (QuantConfig(weight_bits=8), 1.0),
        (QuantConfig(weight_bits=4), 1.0),
        (
            QuantConfig(weight_bits=4, symmetric=False, per_channel=False),
            0.5,
        ),  # zero points, pruned zeros as codes = zero point
    ],
    ids=["int8", "int4", "uint4-per-tensor-pruned"],
)
def test_a_quantized_model_stores_its_integer_codes_and_computes_the_same_outputs(
    tmp_path, config: QuantConfig, keep: float
) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        for layer in weight_layers(model):
            layer.weight.uniform_(-1, 1)  # codes spread evenly over the grid: xz cannot squeeze them
    prune(model, keep)
    quantize_model(model, config)
    model.train()(torch.randn(16, *INPUT))  # observe
    set_quantization(model, enabled=True)
    model.eval()
    x = torch.randn(5, *INPUT)
    expected = model(x)
    path = export(model, tmp_path / "model.lcz", x[:1], format="compressed")

    fresh = load_compressed(small_cnn(), path).eval()  # a float model: the file quantizes it first
    assert torch.equal(fresh(x), expected)
    assert {name: layer.quant_config for name, layer in quantized_layers(fresh).items()} == {
        "0": config,
        "4": config,
        "6": config,
    }
    fake_quantized = {
        f"{name}.weight": layer.weight_quantizer(layer.weight) for name, layer in quantized_layers(model).items()
    }
    assert list(fake_quantized) == list(WEIGHTS)
    state = fresh.state_dict()
    assert all(same_bits(state[name], fake_quantized.get(name, tensor)) for name, tensor in model.state_dict().items())

    data = path.read_bytes()
    levels = config.weight_range[1] - config.weight_range[0] + 1  # 127 (7-bit weights by default) or 16
    bits = (levels - 1).bit_length()
    assert [(entries(data)[name]["values"]["kind"], entries(data)[name]["values"]["bits"]) for name in WEIGHTS] == [
        ("codes", bits)
    ] * 3
    weights = [layer.weight for layer in weight_layers(model)]
    stored = sum(int(w.count_nonzero()) if keep < 1 else w.numel() for w in weights)
    positions = sum(w.numel() for w in weights) if keep < 1 else 0  # a bitmask, incompressible at half density
    others = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name not in fake_quantized)
    upper = (stored * bits + positions) / 8 + others + manifest_of(data)[1] + len(MAGIC) + HEADER_BYTES
    lower = 0.95 * (stored * math.log2(levels) + positions) / 8
    assert lower <= len(data) <= upper, (lower, len(data), upper)
    ratio = len(data) / torch_save_bytes(model)
    # of torch.save's 4 bytes a weight: bits / 32 for the codes (a bit more for a bitmask), plus the quantizers' state
    assert ratio < (bits * keep + (1 if keep < 1 else 0)) / 32 + 0.05, ratio  # measured 0.184, 0.119, 0.088


@pytest.mark.parametrize(
    "other, reason",
    [
        (
            lambda: small_cnn(hidden=16),
            "tensor '4.weight' is float32 [32, 288] in the file but float32 [16, 288] in the model",
        ),
        (
            lambda: small_cnn().double(),
            "tensor '0.weight' is float32 [8, 3, 3, 3] in the file but float64 [8, 3, 3, 3] in the model",
        ),
        (lambda: nn.Sequential(*small_cnn()[:5]), "tensor '6.weight' of the file is not in the model"),
        (lambda: nn.Sequential(*small_cnn(), nn.Linear(10, 2)), "tensor '7.weight' of the model is not in the file"),
    ],
    ids=["shape", "dtype", "fewer", "more"],
)
def test_a_file_of_another_architecture_names_the_first_tensor_that_differs_and_changes_nothing(
    tmp_path, other, reason: str
) -> None:
    torch.manual_seed(0)
    path = export(small_cnn(), tmp_path / "model.lcz", torch.zeros(1, *INPUT), format="compressed")
    model = other()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path} does not fit Sequential: {reason}')}$"):
        load_compressed(model, path)
    assert all(same_bits(tensor, state[name]) for name, tensor in model.state_dict().items()) and list(
        model.state_dict()
    ) == list(state)


@pytest.mark.parametrize(
    "other, reason",
    [
        (
            lambda: quantize_model(model := small_cnn(), QuantConfig(weight_bits=4)) and model,
            "layer '0' is quantized with weight_bits=4 in the model but weight_bits=8 in the file",
        ),
        (
            lambda: nn.Sequential(*small_cnn()[:4]),
            "its quantized layers are not the model's: the pattern '4' matches no layer with a weight; near names: ['0']",
        ),
    ],
    ids=["settings", "layers"],
)
def test_a_quantized_file_needs_the_same_quantized_layers(tmp_path, other, reason: str) -> None:
    torch.manual_seed(0)
    saved = small_cnn()
    quantize_model(saved, QuantConfig(weight_bits=8))
    path = export(saved, tmp_path / "model.lcz", torch.zeros(1, *INPUT), format="compressed")
    model = other()
    types = [type(module) for module in model.modules()]
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path} does not fit Sequential: {reason}')}$"):
        load_compressed(model, path)
    assert [type(module) for module in model.modules()] == types


def test_every_dtype_and_shape_comes_back_exactly(tmp_path) -> None:
    sparse = torch.zeros(100_000)
    sparse[[5, 70_000]] = torch.tensor([1.0, 2.0])
    tensors = {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "counts": torch.tensor([0, 0, 7, -(2**40), 0, 0, 0, 0]),
        "mask": torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.2,
        "halves": torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).half(),
        "bfloat": torch.tensor([0.0, 1.5, 0.0, -3.0]).bfloat16(),
        "nan_payload": torch.tensor([0x7FC00001, 0, 0x3F800000], dtype=torch.int32).view(torch.float32),
        "doubles": torch.tensor([0.0] * 50 + [math.pi], dtype=torch.float64),
        "sparse": sparse,
    }
    saved, fresh = nn.Module(), nn.Module()
    for name, tensor in tensors.items():
        saved.register_buffer(name, tensor)
        fresh.register_buffer(name, torch.ones_like(tensor))
    path = export(saved, tmp_path / "buffers.lcz", torch.zeros(1), format="compressed")
    load_compressed(fresh, path)
    assert all(same_bits(getattr(fresh, name), tensor) for name, tensor in tensors.items())
    stored = entries(path.read_bytes())
    assert stored["sparse"]["positions"]["kind"] == "gaps"  # 2 of 100,000: gaps take bytes where a bitmask takes 12,500
    assert (
        stored["mask"]["values"]["kind"] == "codebook" and stored["mask"]["values"]["bits"] == 0
    )  # where True is, is all there is
    assert stored["scalar"] == {
        "name": "scalar",
        "dtype": "float32",
        "shape": [],
        "positions": {"kind": "all"},
        "values": {"kind": "raw", "blob": stored["scalar"]["values"]["blob"]},
    }


def test_loading_unpickles_nothing_and_the_manifest_is_json(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    prune(model, keep=0.3)
    path = export(model, tmp_path / "model.lcz", torch.zeros(1, *INPUT), format="compressed")
    data = path.read_bytes()
    assert data.startswith(b"lightning_compress.compressed/3\n")
    assert re.fullmatch(rb"(xz|none) \d+ [0-9a-f]{64}", data[len(MAGIC) :].split(b"\n")[0])
    manifest, _ = manifest_of(data)
    assert manifest["format"] == "lightning_compress.compressed/3" and manifest["quantized_layers"] == {}
    assert [entry["name"] for entry in manifest["tensors"]] == list(model.state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, refuse)
    fresh = load_compressed(small_cnn(), path)
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in model.state_dict().items())


def test_other_files_and_format_names_are_refused(tmp_path) -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"^unknown export format 'zip'; use one of onnx, torch, compressed$"):
        export(model, tmp_path / "m.zip", torch.zeros(1, 4), format="zip")
    assert not (tmp_path / "m.zip").exists()
    torch_file = export(model, tmp_path / "m.pt", torch.zeros(1, 4), format="torch")
    with pytest.raises(
        ValueError,
        match=f"^{re.escape(f'{torch_file} is not a file written by export(..., format=' + repr('compressed') + ')')}$",
    ):
        load_compressed(model, torch_file)
    truncated = tmp_path / "truncated.lcz"
    truncated.write_bytes(compressed_bytes(model)[:-10])
    with pytest.raises(ValueError, match=f"^{re.escape(str(truncated))} is not a file written by export"):
        load_compressed(model, truncated)


def test_thousands_of_damaged_or_edited_files_load_exactly_or_fail_clearly_in_bounded_memory() -> None:
    """Byte flips, truncations and hostile manifest fields (checksum made anew) of a real file, and three memory
    bombs, in a process of its own (see fuzz_compressed.py): each loads the original exactly or raises ValueError,
    the model unchanged, and the process's peak memory grows by less than 64 MiB."""
    script = Path(__file__).with_name("fuzz_compressed.py")
    result = subprocess.run(
        [sys.executable, str(script), "2000", "0"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["loaded"] + outcome["refused"] == 2000 + 3 and outcome["refused"] > 1000
    assert outcome["peak_growth_mib"] < 64


def test_a_damaged_or_oversized_file_is_refused_before_it_is_decoded(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 16)
    data = compressed_bytes(model)
    payload = payload_of(data)
    path = tmp_path / "m.lcz"
    sealed = with_header(MAGIC, payload)
    flipped = bytearray(sealed)
    flipped[-5] ^= 1  # a weight's byte: without a checksum this loaded, one weight changed
    edited = sealed.replace(b'"float32"', b'"float16"', 1)  # as long as before: only the checksum can tell
    cases = [
        (bytes(flipped), "its payload's SHA-256 differs from the one its header holds: the file is damaged"),
        (edited, "its payload's SHA-256 differs from the one its header holds"),
        (MAGIC + b"xz %d %s\n" % (10**12, b"0" * 64), r"declares a payload of 1,000,000,000,000 bytes, more than"),
        (MAGIC + b"none 3 abc\n", r"its header line b'none 3 abc' is not a codec, a length and a SHA-256"),
        (with_header(MAGIC, payload + bytes(most_payload_bytes(model))), r"holds [\d,]+ bytes, more than a compressed"),
    ]
    for content, reason in cases:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=reason):
            load_compressed(nn.Linear(64, 16), path)

    def bomb(manifest: dict) -> None:  # 13.7 KB that once asked for gigabytes
        manifest["tensors"][0]["values"] = {"kind": "codebook", "bits": 100_000_000, "table": [0, 4], "blob": [0, 4]}

    path.write_bytes(rewritten(data, bomb))
    with pytest.raises(ValueError, match=r"tensor 'weight' cannot be read: ValueError: bits=100000000: an int from 0"):
        load_compressed(nn.Linear(64, 16), path)
