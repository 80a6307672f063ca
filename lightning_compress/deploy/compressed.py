"""``export(..., format="compressed")``: a state dict in the fewest bytes that restore it exactly, and ``load_compressed``.

The file is the line ``lightning_compress.compressed/3``, a line naming the codec of the rest (``xz``
or ``none``, whichever is smaller), the payload's length in bytes and its SHA-256 (``xz 18342 9f86d0...``), then
the payload: a JSON manifest on one line and the binary blobs it points into by ``[offset, length]``. Nothing in
it is pickled: loading parses JSON and unpacks integers. For each tensor of the state dict, in order, the manifest holds its name, dtype, shape and
encoding, chosen as the fewest bytes among:

- positions: ``all`` (every element stored), or only the elements that are not zero, marked by a
  ``bitmask`` (one bit per element) or by ``gaps`` (the zeros before each stored element, at the bit
  width that costs least; the all-ones code skips that many zeros). The zeros left out come back as
  ``0.0``: a negative zero (what a pruning mask makes of a negative weight) too, which is equal to
  it and computes the same; keeping its sign would cost a bit per zero.
- values: ``raw`` (the dtype's bytes), a ``codebook`` of at most 256 distinct bit patterns with
  indices at ``ceil(log2 k)`` bits (clustered or shared weights), or, for the weight of a layer with
  fake quantization enabled, its quantizer's integer ``codes`` at the grid's bit width, which
  dequantize as ``(code - zero_point) * scale`` with the scale and zero point of the state dict.

Each stream of small integers (gap codes, codebook indices, integer codes) is stored in the fewer bytes of two:
packed at its bit width, little-endian (first value in the lowest bits), or, for at most 8 bits, one byte each
compressed by LZMA2 on its own (``"packing": "lzma"``: a raw stream, no header, the filter
:data:`SYMBOL_FILTERS`), whose adaptive coding comes near the stream's entropy where its values are skewed (most
gaps short, most shared values near zero), which a fixed width cannot. Bytes are little-endian.

A file is read as untrusted input, within bounds set by the model it loads into (:func:`most_payload_bytes`):
the file's size, the payload it decompresses to (never more than its declared length is inflated), and every
field of the manifest (bit widths of at most 32, counts of at most what the tensor's shape allows, codebooks of at
most ``2**bits`` entries) are checked before anything is allocated for them, and the payload's SHA-256 before
anything is decoded, so a flipped byte or an edited field fails with a ``ValueError`` that names what is wrong.
Version 2 files (no length and checksum) and version 1 files (bit packing only) load within the same bounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.deploy.export import _load, quantize_as_saved, quantizer_settings
from lightning_compress.deploy.integer_layers import IntegerLayer
from lightning_compress.modules import eval_mode, model_copy
from lightning_compress.quantization.layers import QuantizedLayer, quantized_layers

MAGIC = b"lightning_compress.compressed/3\n"
#: The first lines of the files :func:`load_compressed` reads: this version's, version 2's (no length and checksum)
#: and version 1's (no ``packing`` either).
READABLE = (MAGIC, b"lightning_compress.compressed/2\n", b"lightning_compress.compressed/1\n")
#: The widest integers a stream of the manifest may declare (integer codes of int32 grids at most).
MOST_BITS = 32
_CODECS = (b"xz", b"none")
#: The longest header line a file may have: a codec, a length and a SHA-256 in hex.
HEADER_BYTES = 4 + 1 + 20 + 1 + 64 + 1
CODEBOOK_SIZE = 256  # the most distinct values a codebook holds (indices of at most 8 bits)
_SIGNED_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ENTRY_FIELDS = frozenset({"name", "dtype", "shape", "positions", "values"})
_PACK_CHUNK = 1 << 20  # values packed at a time (a multiple of 8, so chunks end on byte boundaries)

# (bytes it will take, writer that adds its blobs and returns its manifest fields)
_Plan = tuple[int, Callable[["_Blobs"], dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class _Codes:
    """A fake-quantized weight as its quantizer's integers: ``codes + low`` on the grid ``[low, low + 2^bits - 1]``."""

    codes: torch.Tensor  # flat, int64, from 0
    low: int
    bits: int
    scale: torch.Tensor  # the weight quantizer's, per output channel or per tensor
    zero_point: torch.Tensor
    keys: tuple[str, str]  # their names in the state dict


#: xz's fastest preset: on dense float32 weights 3x the speed of its default (6), for files 0.3-0.6% larger.
XZ_PRESET = 0
#: The LZMA2 filter of a symbol stream stored one byte per symbol: one high bit of the previous byte as a literal's
#: context (none for symbols below 128) and no position bits, as the symbols have no alignment (on a 95%-sparse
#: layer's gaps and 3-bit indices, 9% and 18% fewer bytes than xz's preset 0).
SYMBOL_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 1, "lp": 0, "pb": 0},)


class _Blobs:
    """The binary part of the payload, appended to; each blob is referred to as ``[offset, length]``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        self.parts.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data)]


def compressed_bytes(model: nn.Module) -> bytes:
    """The ``format="compressed"`` file of ``model``, without writing it: its length is the model's compressed size.

    Every tensor of ``model.state_dict()`` is kept exactly, each quantized layer's weight (fake
    quantization enabled) as its fake-quantized value ``(code - zero_point) * scale``. The quantized
    layers' settings go in the file too, so :func:`load_compressed` can quantize a float model first.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(1000, 100, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(torch.rand(100, 1000) < 0.1)   # 90% zeros
        >>> round(len(compressed_bytes(model)) / (4 * 100_000), 2)   # of the float32 bytes
        0.11
    """
    targets = _quantized_weights(model)
    blobs = _Blobs()
    tensors = []
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"state dict entry {name!r} is a {type(tensor).__name__}; the compressed format holds tensors only"
            )
        target, codes = targets.get(name, (tensor, None))
        tensors.append({"name": name, **_encode(target, codes, blobs)})
    manifest = {"format": MAGIC.decode().strip(), "quantized_layers": quantizer_settings(model), "tensors": tensors}
    payload = json.dumps(manifest, separators=(",", ":")).encode() + b"\n" + b"".join(blobs.parts)
    packed = lzma.compress(payload, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    codec, body = (b"xz", packed) if len(packed) < len(payload) else (b"none", payload)
    return MAGIC + b"%s %d %s\n" % (codec, len(payload), hashlib.sha256(payload).hexdigest().encode()) + body


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an ``export(..., format="compressed")`` file into ``model``, in place, and return it.

    ``model`` is the exported architecture, in float or quantized as in the file: the layers the file
    names as quantized are quantized with its settings (layers already quantized must have the same
    settings). Then its state dict is the exported one, each element's bits (a negative zero comes back
    as ``0.0``), dtypes and shapes, with each quantized layer's weight its fake-quantized value: the
    model computes the exported model's outputs exactly. The file is
    checked against the model first, names, shapes and dtypes, on a copy: a file that does not fit
    raises ``ValueError`` naming the first tensor that differs, and leaves ``model`` as it was.

    Example:
        >>> import tempfile, torch
        >>> from lightning_compress.deploy import export
        >>> trained = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> path = export(trained, tempfile.mkdtemp() + "/model.lcz", torch.zeros(1, 4), format="compressed")
        >>> fresh = load_compressed(torch.nn.Sequential(torch.nn.Linear(4, 2)), path)
        >>> all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
        True
    """
    manifest, blobs = _read(Path(path), most_payload_bytes(model))
    mismatch = _mismatch(model, manifest)
    if mismatch:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {mismatch}")
    state_dict = _decode_all(manifest["tensors"], blobs, path)
    return _load(model, {"quantized_layers": manifest["quantized_layers"], "state_dict": state_dict})


@torch.no_grad()
def _quantized_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, _Codes]]:
    """By state dict key, the weight of each layer with fake quantization on: fake-quantized, and as its integers."""
    weights = {}
    with eval_mode(model):  # the weight quantizers must not observe
        for name, layer in quantized_layers(model).items():
            if not bool(layer.weight_quantizer.enabled):
                continue
            prefix = f"{name}." if name else ""
            integer = IntegerLayer.of(layer)
            low, high = integer.weight_range
            codes = torch.from_numpy(integer.weight).reshape(-1) - low
            quantizer = layer.weight_quantizer
            keys = (f"{prefix}weight_quantizer.scale", f"{prefix}weight_quantizer.zero_point")
            weights[f"{prefix}weight"] = (
                quantizer(layer.weight).detach(),
                _Codes(
                    codes,
                    low,
                    (high - low).bit_length(),
                    quantizer.scale.detach().cpu(),
                    quantizer.zero_point.cpu(),
                    keys,
                ),
            )
    return weights


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor``'s values and positions take in the compressed format, in their cheapest exact encoding
    (before xz, without the manifest): what compressing one tensor more or less changes in the file.

    Example:
        >>> weight = torch.zeros(100, 100)
        >>> weight[::10, ::10] = torch.arange(100.0).reshape(10, 10) % 4 + 1   # 1% non-zero, 4 distinct values
        >>> tensor_bytes(weight)   # a table of 4 float32 values, then 100 indices and gaps, which repeat: LZMA2's
        54
        >>> tensor_bytes(torch.randn(100, 100))   # every float32 value as it is
        40000
    """
    return _cheapest_plan(tensor, None)[0]


def _encode(tensor: torch.Tensor, codes: _Codes | None, blobs: _Blobs) -> dict[str, Any]:
    """The manifest entry of ``tensor`` in its cheapest exact encoding, whose blobs go into ``blobs``."""
    entry: dict[str, Any] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    _, write = _cheapest_plan(tensor, codes)
    return {**entry, **write(blobs)}


def _cheapest_plan(tensor: torch.Tensor, codes: _Codes | None) -> _Plan:
    """The cheapest exact encoding of ``tensor``'s positions and values, as a plan."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    signed = _SIGNED_OF_SIZE.get(tensor.dtype.itemsize)
    if signed is None:  # no integer type of its size to compare bit patterns with (complex128): as it is
        return _combine(
            (0, lambda _: {"kind": "all"}),
            (flat.numel() * flat.element_size(), lambda blobs: {"kind": "raw", "blob": blobs.add(_raw(flat))}),
        )
    patterns = flat.view(signed)
    zero = patterns == 0
    if tensor.is_floating_point():
        zero |= patterns == torch.iinfo(signed).min  # -0.0
    everything = torch.arange(flat.numel())
    plans = [
        _combine((0, lambda _: {"kind": "all"}), _value_plan(patterns, everything, codes, flat)),
        _combine(_position_plan(~zero), _value_plan(patterns[~zero], everything[~zero], codes, flat)),
    ]
    return min(plans, key=lambda plan: plan[0])


def _combine(positions: _Plan, values: _Plan) -> _Plan:
    """The plan of both manifest fields: their bytes summed, their writers run in order."""
    return positions[0] + values[0], lambda blobs: {"positions": positions[1](blobs), "values": values[1](blobs)}


def _value_plan(patterns: torch.Tensor, positions: torch.Tensor, codes: _Codes | None, flat: torch.Tensor) -> _Plan:
    """The cheapest exact encoding of the bit ``patterns`` of the elements of ``flat`` at ``positions``."""
    plans: list[_Plan] = [
        (patterns.numel() * patterns.element_size(), lambda blobs: {"kind": "raw", "blob": blobs.add(_raw(patterns))})
    ]
    head = patterns[
        : CODEBOOK_SIZE * 64
    ]  # more distinct values there already rule a codebook out, at a fraction of the cost
    if torch.unique(head).numel() <= CODEBOOK_SIZE:
        table, indices = torch.unique(patterns, return_inverse=True)
        if table.numel() <= CODEBOOK_SIZE:
            bits = (table.numel() - 1).bit_length() if table.numel() else 0
            cost, write = _symbols_plan(indices, bits)
            plans.append(
                (
                    table.numel() * table.element_size() + cost,
                    lambda blobs: {"kind": "codebook", "table": blobs.add(_raw(table)), **write(blobs)},
                )
            )
    if codes is not None:
        stored = codes.codes[positions]
        decoded = _dequantize(stored, positions, codes.low, codes.scale, codes.zero_point, flat.numel()).to(flat.dtype)
        if torch.equal(
            decoded.view(patterns.dtype), patterns
        ):  # exact in this dtype (a half-precision weight may not be)
            cost, write = _symbols_plan(stored, codes.bits)
            plans.append(
                (
                    cost,
                    lambda blobs: {
                        "kind": "codes",
                        "low": codes.low,
                        "scale": codes.keys[0],
                        "zero_point": codes.keys[1],
                        **write(blobs),
                    },
                )
            )
    return min(plans, key=lambda plan: plan[0])


def _position_plan(mask: torch.Tensor) -> _Plan:
    """The cheapest of a bitmask and gaps marking the true elements of the flat ``mask``: gaps at the width whose
    packing costs least, or at 8 bits where LZMA2 stores them in fewer bytes."""
    gaps = torch.diff(torch.nonzero(mask).reshape(-1), prepend=torch.tensor([-1])) - 1
    largest = int(gaps.max()) if gaps.numel() else 0
    # at b bits a gap g takes g // (2^b - 1) skip codes and one more; from (largest + 1).bit_length() bits none skip
    costs = {
        bits: _bytes(bits * int((gaps // (2**bits - 1) + 1).sum())) for bits in range(1, (largest + 1).bit_length() + 1)
    }
    plans = [
        (_bytes(mask.numel()), lambda blobs: {"kind": "bitmask", "blob": blobs.add(_pack(mask.long(), 1))}),
        *(_gaps_plan(_gap_codes(gaps, bits), bits) for bits in {min(costs, key=costs.__getitem__), 8}),
    ]
    return min(plans, key=lambda plan: plan[0])


def _gaps_plan(codes: torch.Tensor, bits: int) -> _Plan:
    cost, write = _symbols_plan(codes, bits)
    return cost, lambda blobs: {"kind": "gaps", "count": codes.numel(), **write(blobs)}


def _symbols_plan(symbols: torch.Tensor, bits: int) -> _Plan:
    """The fewer bytes of ``symbols`` (non-negative integers below ``2**bits``) packed at ``bits`` bits and, for at
    most 8 bits, one byte each compressed by LZMA2 (:data:`SYMBOL_FILTERS`)."""
    plans: list[_Plan] = [
        (_bytes(symbols.numel() * bits), lambda blobs: {"bits": bits, "blob": blobs.add(_pack(symbols, bits))})
    ]
    if 0 < bits <= 8 and symbols.numel():
        data = lzma.compress(symbols.to(torch.uint8).numpy().tobytes(), format=lzma.FORMAT_RAW, filters=SYMBOL_FILTERS)
        plans.append((len(data), lambda blobs: {"bits": bits, "packing": "lzma", "blob": blobs.add(data)}))
    return min(plans, key=lambda plan: plan[0])


def _symbols(field: dict[str, Any], blobs: memoryview, count: int) -> torch.Tensor:
    """The ``count`` integers a manifest field with ``bits``, ``blob`` and optional ``packing`` stores, as int64; never
    more than ``count`` are decompressed."""
    data, bits = _blob(blobs, field["blob"]), _bits(field)
    packing = field.get("packing", "bits")
    if packing == "bits":
        return _unpack(data, bits, count)
    if packing != "lzma" or not 0 < bits <= 8:
        raise ValueError(f"packing {packing!r} of {bits}-bit values: only 'bits', or 'lzma' of 1 to 8 bits, is known")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=SYMBOL_FILTERS)
    try:
        stored = decompressor.decompress(bytes(data), max_length=count)
        more = b"" if decompressor.eof else decompressor.decompress(b"", max_length=1)
    except lzma.LZMAError as error:
        raise ValueError(f"the lzma blob [{field['blob'][0]}, {len(data)}] is damaged: {error}") from error
    if len(stored) != count or more or not decompressor.eof or decompressor.unused_data:
        raise ValueError(f"the lzma blob [{field['blob'][0]}, {len(data)}] does not hold exactly {count} values")
    symbols = torch.frombuffer(bytearray(stored), dtype=torch.uint8).long() if count else torch.zeros(0).long()
    if count and int(symbols.max()) >= 2**bits:
        raise ValueError(f"the lzma blob [{field['blob'][0]}, {len(data)}] holds values of more than {bits} bits")
    return symbols


def _bits(field: dict[str, Any], most: int = MOST_BITS) -> int:
    """The ``bits`` of a manifest field: an int from 0 to ``most``, else ``ValueError``."""
    bits = field["bits"]
    if not _is_int(bits) or not 0 <= bits <= most:
        raise ValueError(f"bits={str(bits)[:20]}: an int from 0 to {most} is allowed")
    return bits


def _gap_codes(gaps: torch.Tensor, bits: int) -> torch.Tensor:
    """``gaps`` as codes of ``bits`` bits: the all-ones code ``m`` skips ``m`` zeros, any other code ``g`` skips ``g`` and marks the next."""
    skip = 2**bits - 1
    skips = gaps // skip
    ends = torch.cumsum(skips + 1, 0) - 1
    codes = torch.full((int(ends[-1]) + 1 if ends.numel() else 0,), skip, dtype=torch.long)
    codes[ends] = gaps - skips * skip
    return codes


def _marked(positions: dict[str, Any], blobs: memoryview, length: int) -> torch.Tensor:
    """The flat indices, among ``length`` elements, that a ``bitmask`` or ``gaps`` entry marks."""
    if positions["kind"] == "bitmask":
        return torch.nonzero(_unpack(_blob(blobs, positions["blob"]), 1, length)).reshape(-1)
    if positions["kind"] != "gaps":
        raise ValueError(f"unknown positions kind {positions['kind']!r}")
    count, most = positions["count"], 2 * length + 1  # a code for each kept element and at most one per skipped zero
    if not _is_int(count) or not 0 <= count <= most:
        raise ValueError(f"gaps count={str(count)[:20]}: at most {most} codes mark {length} elements")
    skip = 2 ** _bits(positions) - 1
    codes = _symbols(positions, blobs, count)
    marks = codes != skip
    indices = (torch.cumsum(codes + marks, 0) - 1)[marks]
    if indices.numel() and int(indices[-1]) >= length:
        raise ValueError(f"gaps run past the {length} elements of the tensor")
    return indices


def _dequantize(
    codes: torch.Tensor, positions: torch.Tensor, low: int, scale: torch.Tensor, zero_point: torch.Tensor, numel: int
) -> torch.Tensor:
    """``(code - zero_point) * scale`` in float32 for the elements at flat ``positions``, as ``torch.fake_quantize_*`` computes it."""
    channel = positions // (numel // scale.numel())
    return (codes + low - zero_point.reshape(-1).long()[channel]).float() * scale.reshape(-1).float()[channel]


def _pack(values: torch.Tensor, bits: int) -> bytes:
    """Non-negative integers at ``bits`` bits each, the first in the lowest bits of the first byte."""
    shifts = torch.arange(bits)
    chunks = (
        ((chunk.reshape(-1, 1) >> shifts) & 1).to(torch.uint8).numpy()
        for chunk in values.reshape(-1).split(_PACK_CHUNK)
    )
    return b"".join(np.packbits(chunk.reshape(-1), bitorder="little").tobytes() for chunk in chunks)


def _unpack(data: memoryview, bits: int, count: int) -> torch.Tensor:
    """The ``count`` integers of ``bits`` bits that :func:`_pack` wrote into ``data``, as int64."""
    if _bytes(count * bits) != len(data):
        raise ValueError(f"{count} values of {bits} bits take {_bytes(count * bits)} bytes, the blob has {len(data)}")
    if bits == 0:
        return torch.zeros(count, dtype=torch.long)
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = torch.ones(bits, dtype=torch.long) << torch.arange(bits)
    step = _PACK_CHUNK * bits // 8
    chunks = [np.unpackbits(raw[start : start + step], bitorder="little") for start in range(0, len(raw), step)]
    values = [
        (torch.from_numpy(chunk[: len(chunk) // bits * bits]).reshape(-1, bits).long() * weights).sum(1)
        for chunk in chunks
    ]
    return torch.cat(values)[:count] if values else torch.zeros(0, dtype=torch.long)


def _bytes(bits: int) -> int:
    return (bits + 7) // 8


def _raw(tensor: torch.Tensor) -> bytes:
    """The bytes of a contiguous tensor, as it holds them."""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _from_raw(data: memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count * dtype.itemsize != len(data):
        raise ValueError(f"{count} values of {dtype} take {count * dtype.itemsize} bytes, the blob has {len(data)}")
    return torch.frombuffer(bytearray(data), dtype=dtype) if count else torch.empty(0, dtype=dtype)


def _blob(blobs: memoryview, reference: list[int]) -> memoryview:
    offset, length = reference
    if offset < 0 or length < 0 or offset + length > len(blobs):
        raise ValueError(f"blob [{offset}, {length}] lies outside the {len(blobs)} bytes of blobs")
    return blobs[offset : offset + length]


def most_payload_bytes(model: nn.Module) -> int:
    """The most bytes the payload of a compressed file that loads into ``model`` may hold: twice the bytes of its
    state dict (the quantizers a file may add to a float model's layers hold far less than their weights), 4 KiB
    of manifest a tensor and 1 MiB more. Larger files are refused before they are read.

    Example:
        >>> most_payload_bytes(torch.nn.Linear(1000, 100)) == 2 * 4 * (100_000 + 100) + 2 * 4096 + (1 << 20)
        True
    """
    tensors = model.state_dict().values()
    return 2 * sum(t.numel() * t.element_size() for t in tensors) + 4096 * len(tensors) + (1 << 20)


def _read(path: Path, most: int) -> tuple[dict[str, Any], memoryview]:
    """The manifest and the blobs of a compressed file whose payload may hold at most ``most`` bytes; ``ValueError``
    for any other file, a damaged one, or one larger than that."""
    not_ours = f"{path} is not a file written by export(..., format='compressed')"
    size = path.stat().st_size
    if size > most + len(MAGIC) + HEADER_BYTES:
        raise ValueError(
            f"{path} holds {size:,} bytes, more than a compressed file of the model's tensors can (a payload of at "
            f"most {most:,} bytes)"
        )
    data = path.read_bytes()
    first_line = next((line for line in READABLE if data.startswith(line)), None)
    if first_line is None:
        raise ValueError(not_ours)
    header, _, body = data[len(first_line) :].partition(b"\n")
    try:
        codec, length, digest = _header(header, first_line == MAGIC, most)
        payload = _inflated(codec, body, length, exact=digest is not None)
        if digest is not None and hashlib.sha256(payload).hexdigest() != digest:
            raise ValueError("its payload's SHA-256 differs from the one its header holds: the file is damaged")
        line, _, blobs = payload.partition(b"\n")
        manifest = json.loads(line)
        _check_manifest(manifest)
    except (lzma.LZMAError, ValueError, RecursionError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{not_ours}: {error}") from error
    return manifest, memoryview(blobs)


def _header(header: bytes, versioned: bool, most: int) -> tuple[bytes, int, str | None]:
    """The codec, the payload's length and its SHA-256 that a header line holds (a version 1 or 2 header, the codec
    alone: at most ``most`` bytes, no checksum)."""
    if not versioned:
        if header not in _CODECS:
            raise ValueError(f"unknown codec {header[:20]!r}")
        return header, most, None
    fields = header.split(b" ")
    if (
        len(fields) != 3
        or fields[0] not in _CODECS
        or not fields[1].isdigit()
        or len(fields[1]) > 20
        or len(fields[2]) != 64
        or fields[2].strip(b"0123456789abcdef")
    ):
        raise ValueError(f"its header line {header[:HEADER_BYTES]!r} is not a codec, a length and a SHA-256")
    length = int(fields[1])
    if length > most:
        raise ValueError(
            f"it declares a payload of {length:,} bytes, more than the model's tensors can need ({most:,})"
        )
    return fields[0], length, fields[2].decode()


def _inflated(codec: bytes, body: bytes, length: int, exact: bool) -> bytes:
    """The payload of ``body``: never more than ``length`` bytes inflated; exactly that many if ``exact``."""
    payload = body
    if codec == b"xz":
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        payload = decompressor.decompress(body, max_length=length)
        if not decompressor.eof and decompressor.decompress(b"", max_length=1):
            raise ValueError(f"its xz stream holds more than {length:,} bytes")
        if not decompressor.eof:
            raise ValueError("its xz stream is cut short")
        if decompressor.unused_data:
            raise ValueError("bytes follow its xz stream")
    if len(payload) > length or exact and len(payload) != length:
        raise ValueError(f"its payload has {len(payload):,} bytes where its header says {length:,}")
    return payload


def _check_manifest(manifest: Any) -> None:
    """Fail unless ``manifest`` has the form of one: its quantized layers' settings by name, and its tensors' entries
    with a name, a dtype, a shape of non-negative ints, and their positions and values as objects."""
    if not isinstance(manifest, dict) or not {"quantized_layers", "tensors"} <= manifest.keys():
        raise ValueError("its manifest lacks quantized_layers or tensors")
    layers, tensors = manifest["quantized_layers"], manifest["tensors"]
    if not isinstance(layers, dict) or not all(isinstance(settings, dict) for settings in layers.values()):
        raise ValueError("its manifest's quantized_layers is not an object of settings by layer name")
    if not isinstance(tensors, list) or not all(isinstance(e, dict) and _ENTRY_FIELDS <= e.keys() for e in tensors):
        raise ValueError(f"a tensor of its manifest lacks one of {', '.join(sorted(_ENTRY_FIELDS))}")
    for entry in tensors:
        shape = entry["shape"]
        well_formed = (
            isinstance(entry["name"], str)
            and isinstance(entry["dtype"], str)
            and isinstance(shape, list)
            and all(_is_int(size) and size >= 0 for size in shape)
            and isinstance(entry["positions"], dict)
            and isinstance(entry["values"], dict)
        )
        if not well_formed:
            raise ValueError(f"its manifest's entry {str(entry.get('name'))[:80]!r} is not a tensor's")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mismatch(model: nn.Module, manifest: dict[str, Any]) -> str:
    """Why ``model`` cannot take the file's tensors, or ``""``: its quantized layers, then the first tensor that differs.

    The file's layers are quantized on a copy, so ``model`` stays as it is either way.
    """
    layers = dict(model.named_modules())
    for name, settings in manifest["quantized_layers"].items():
        layer = layers.get(name)
        if isinstance(layer, QuantizedLayer) and dataclasses.asdict(layer.quant_config) != settings:
            differ = [
                key for key, value in dataclasses.asdict(layer.quant_config).items() if settings.get(key) != value
            ]
            ours, theirs = (
                ", ".join(f"{key}={values[key]!r}" for key in differ)
                for values in (dataclasses.asdict(layer.quant_config), settings)
            )
            return f"layer {name!r} is quantized with {ours} in the model but {theirs} in the file"
    trial = model_copy(model) if manifest["quantized_layers"] else model
    try:
        quantize_as_saved(trial, manifest["quantized_layers"])
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        return f"its quantized layers are not the model's: {next(iter(str(error).splitlines()), type(error).__name__)}"
    ours = {
        name: (str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        for name, tensor in trial.state_dict().items()
    }
    for entry in manifest["tensors"]:
        name, theirs = entry["name"], (entry["dtype"], entry["shape"])
        if name not in ours:
            return f"tensor {name!r} of the file is not in the model"
        if ours[name] != theirs:
            return f"tensor {name!r} is {_describe(theirs)} in the file but {_describe(ours[name])} in the model"
    missing = ours.keys() - {entry["name"] for entry in manifest["tensors"]}
    return next((f"tensor {name!r} of the model is not in the file" for name in ours if name in missing), "")


def _describe(dtype_and_shape: tuple[str, list[int]]) -> str:
    dtype, shape = dtype_and_shape
    return f"{dtype} {shape}"


def _decode_all(entries: list[dict[str, Any]], blobs: memoryview, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest by name; quantized weights last, as they read their layers' scales and zero points."""
    tensors: dict[str, torch.Tensor] = {}
    for entry in sorted(
        entries, key=lambda entry: entry.get("values", {}).get("kind") == "codes"
    ):  # stable: the file's order otherwise
        try:
            tensors[entry["name"]] = _decode(entry, blobs, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError, ZeroDivisionError) as error:
            raise ValueError(
                f"{path} is damaged: tensor {entry['name']!r} cannot be read: {type(error).__name__}: {error}"
            ) from error
    return {entry["name"]: tensors[entry["name"]] for entry in entries}


def _decode(entry: dict[str, Any], blobs: memoryview, decoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor of one manifest entry; ``decoded`` holds the scales and zero points that ``codes`` refer to."""
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    numel = math.prod(entry["shape"])
    storage = _SIGNED_OF_SIZE.get(dtype.itemsize, dtype)
    everything = entry["positions"]["kind"] == "all"
    positions = torch.arange(numel) if everything else _marked(entry["positions"], blobs, numel)
    values = _values(entry["values"], blobs, storage, positions, numel, decoded, dtype)
    if everything:
        flat = values
    else:
        flat = torch.zeros(numel, dtype=storage)
        flat[positions] = values
    return flat.view(dtype).reshape(entry["shape"])


def _values(
    values: dict[str, Any],
    blobs: memoryview,
    storage: torch.dtype,
    positions: torch.Tensor,
    numel: int,
    decoded: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The stored elements, at flat ``positions``, as bit patterns of the ``storage`` type."""
    count = positions.numel()
    if values["kind"] == "raw":
        return _from_raw(_blob(blobs, values["blob"]), storage, count)
    if values["kind"] == "codebook":
        entries = len(_blob(blobs, values["table"])) // storage.itemsize
        most = min(2 ** _bits(values, most=8), CODEBOOK_SIZE)
        if entries > most:
            raise ValueError(f"a codebook of {entries} entries: at most {most} for {values['bits']}-bit indices")
        table = _from_raw(_blob(blobs, values["table"]), storage, entries)
        return table[_symbols(values, blobs, count)]
    if values["kind"] == "codes":
        if not _is_int(values["low"]) or not -(2**MOST_BITS) <= values["low"] < 2**MOST_BITS:
            raise ValueError(f"low={str(values['low'])[:20]}: an int of at most {MOST_BITS} bits is allowed")
        codes = _symbols(values, blobs, count)
        weight = _dequantize(
            codes, positions, values["low"], decoded[values["scale"]], decoded[values["zero_point"]], numel
        )
        return weight.to(dtype).view(storage)
    raise ValueError(f"unknown values kind {values['kind']!r}")
