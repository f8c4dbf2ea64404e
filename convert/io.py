"""Read PyTorch checkpoints as numpy; write safetensors, JSON and output folders atomically.

Every failure a user can cause (missing, truncated or unsafe file, a folder without weights, an existing
output, a broken config) surfaces as one `ConversionError` whose message names the file, so the CLI can print
it and exit. PyTorch is only imported for pickle-based files (.ckpt/.pth/.pt/.bin); .safetensors needs numpy
alone (bf16 through ml_dtypes, which JAX depends on). Everything written gets the permissions of a normal
file or folder (0o666 / 0o777 less the umask), not the private 0o600 / 0o700 of a temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from xdyna_jax.io.atomic import atomic_folder, usual_mode

__all__ = [
    "ConversionError",
    "SafetensorsWeights",
    "atomic_file",
    "atomic_output_dir",
    "find_safetensors_weights",
    "find_weights_file",
    "key_list",
    "parse_size",
    "plan_shards",
    "read_json",
    "read_state_dict",
    "refuse_existing_output",
    "write_json",
    "write_manifest",
    "write_safetensors",
    "write_scheduler_config",
    "write_sharded_safetensors",
    "write_sharded_safetensors_from",
]

_TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
# numpy does not count ml_dtypes' bfloat16 as np.floating, so it is named explicitly.
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Keys that wrap the real state dict in training checkpoints (Lightning, DDP scripts, X-Dyna, AnimateDiff).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


class ConversionError(Exception):
    """The one error type converters raise; the message names the offending file, key or shape."""


# --------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a checkpoint file as `{name: numpy array}`.

    Handles `.safetensors`, sharded `*.safetensors.index.json` / `*.bin.index.json` and torch pickles
    (`.ckpt/.pth/.pt/.bin`, always with `weights_only=True`). Wrappers such as `{"state_dict": ..., "epoch": 3}`
    are unwrapped, nested mappings of tensors are flattened with `.`, non-tensor values are dropped, and a
    `module.` prefix shared by every key (DDP) is stripped. Floating tensors come out as float32; integer and
    bool tensors keep their dtype.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(
            f"{path} is a folder, not a checkpoint file (use find_weights_file for folders)"
        )
    if not path.exists():
        raise ConversionError(f"no such file: {path}")
    if path.name.endswith(".index.json"):
        tensors = _read_sharded(path)
    else:
        tensors = _read_file(path)
    if not tensors:
        raise ConversionError(f"{path} contains no tensors")
    return _strip_common_prefix(tensors, "module.")


def _read_file(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise ConversionError(
        f"unsupported checkpoint type {suffix or '(no extension)'!r} for {path}: expected .safetensors, "
        f"{', '.join(_TORCH_SUFFIXES)} or a *.index.json shard index"
    )


def _read_sharded(index_path: Path) -> dict[str, np.ndarray]:
    """diffusers/transformers shard index: `{"weight_map": {tensor name: shard file name}}`."""
    weight_map = read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"cannot read shard index {index_path}: 'weight_map' is empty or not a mapping")

    tensors: dict[str, np.ndarray] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise ConversionError(f"no such file: {shard} (a shard listed in {index_path})")
        tensors.update(_read_file(shard))
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise ConversionError(
            f"{index_path} lists tensors that its shards do not contain: {key_list(missing)}"
        )
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        # safetensors hands bf16 tensors to numpy as ml_dtypes.bfloat16; _to_numpy widens them exactly.
        with safe_open(str(path), framework="np") as f:
            return {key: _to_numpy(f.get_tensor(key), path, key) for key in f.keys()}
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(
            f"cannot read {path}: it is truncated or not a safetensors checkpoint ({_brief(e)})"
        ) from e


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"reading {path} needs PyTorch (install the 'convert' extra), or convert it to .safetensors first"
        ) from e

    obj = _torch_load(torch, path)
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"cannot read {path}: it holds a {type(obj).__name__}, not a mapping of tensor names to tensors"
        )
    flat = _flatten(_unwrap(obj, torch.Tensor), torch.Tensor, path)
    return {k: _torch_to_numpy(v, path, k) for k, v in flat.items()}


def _torch_load(torch: Any, path: Path) -> Any:
    """`torch.load` with weights_only=True (never False: arbitrary pickles can run code).

    mmap=True avoids a second copy of multi-GB files, but only works for the zip format; legacy
    (pre-1.6) pickles raise, and are then read without it.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ConversionError(
                f"cannot read {path}: it is not a plain tensor state dict; torch.load(weights_only=True) "
                f"refused it ({_weights_only_reason(e)}). weights_only=True is required for safety, because "
                "loading arbitrary pickles can execute code. If you trust the file, re-save just its tensors, "
                "e.g. torch.save(model.state_dict(), ...) or as .safetensors."
            ) from e
        raise ConversionError(
            f"cannot read {path}: it is truncated or not a PyTorch checkpoint ({_brief(e)})"
        ) from e
    except Exception as e:
        raise ConversionError(
            f"cannot read {path}: it is truncated or not a PyTorch checkpoint ({_brief(e)})"
        ) from e


def _weights_only_reason(e: Exception) -> str:
    """The useful line of torch's long weights_only message, e.g. 'Unsupported global: GLOBAL foo.Bar ...'."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            reason = reason or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(" was not an allowed global")[0][:200]
    return _brief(e)


def _unwrap(obj: Mapping, tensor_type: type) -> Mapping:
    """Descend through `{"state_dict": {...}, "global_step": 3}`-style wrappers.

    Only when the current level holds no tensors itself: a real state dict may well contain a tensor named
    `model` or `module`, and that must not be mistaken for a wrapper.
    """
    while not any(isinstance(v, tensor_type) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _flatten(obj: Mapping, tensor_type: type, path: Path, prefix: str = "") -> dict[str, Any]:
    """Nested mappings of tensors become dotted names (IP-Adapter .bin: `image_proj.*`, `ip_adapter.*`).

    Non-tensor leaves (step counters, config strings, lists) are dropped.
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, tensor_type):
            items = {name: value}
        elif isinstance(value, Mapping):
            items = _flatten(value, tensor_type, path, prefix=f"{name}.")
        else:
            continue
        for k, v in items.items():
            if k in out:
                raise ConversionError(f"cannot read {path}: tensor name {k!r} occurs twice after flattening")
            out[k] = v
    return out


def _torch_to_numpy(t: Any, path: Path, key: str) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.is_floating_point():
        # .float() first: numpy has no bfloat16, and fp16 weights are upcast anyway.
        return t.to(torch.float32).numpy()
    if t.is_complex() or t.is_quantized or t.layout != torch.strided:
        raise ConversionError(f"{path}: tensor {key!r} has unsupported type {t.dtype} / {t.layout}")
    return t.numpy()


def _to_numpy(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if np.issubdtype(a.dtype, np.floating) or a.dtype == _BFLOAT16:
        return a.astype(np.float32, copy=False)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return a
    raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {a.dtype}")


def _strip_common_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; the body writes it, and it replaces `path` only if the body succeeds.

    A crash mid-write therefore never leaves a half-written file under the final name. The file gets a normal
    file's permissions (mkstemp makes it private). Failures other than KeyboardInterrupt & co. become one
    ConversionError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        usual_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, ConversionError):
            raise ConversionError(f"cannot write {path}: {_brief(e)}") from e
        raise


def write_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `{name: array}` to `path` atomically (see `atomic_file`)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ConversionError(f"cannot write {path}: safetensors metadata must map str to str")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ConversionError(f"cannot write {path}: tensor name {name!r} is not a string")
        arrays[name] = np.ascontiguousarray(np.asarray(value))  # safetensors needs C-contiguous buffers
    with atomic_file(path) as tmp:
        save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from `path`; `what` ("config", "shard index", ...) names the file in the error."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"missing {what} file {path}")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ConversionError(f"cannot read {what} file {path}: {_brief(e)}") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{what} file {path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON (with a final newline) at `path`, atomically; values JSON lacks become str."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """The converter's record of what it read and left out: `folder/manifest.json`."""
    write_json(Path(folder) / "manifest.json", dict(manifest))


def write_scheduler_config(folder: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """`folder/scheduler/scheduler_config.json` as diffusers writes it (DDIM unless `config` names a class)."""
    write_json(
        Path(folder) / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **config}
    )


def refuse_existing_output(path: str | os.PathLike, overwrite: bool) -> None:
    """The one check before writing an output: an existing file or folder needs `overwrite`."""
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ConversionError(
            f"output {path} already exists; pass overwrite=True (--overwrite) to replace it"
        )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder next to `path`; move it to `path` only if the body succeeds
    (`xdyna_jax.io.atomic.atomic_folder`, with the converters' error for an existing output).

    On any exception the temp folder is deleted, so a failed conversion leaves nothing behind (and an
    existing output is left untouched). An existing `path` is refused up front unless `overwrite`.
    """
    refuse_existing_output(path, overwrite)
    try:
        with atomic_folder(path, overwrite=overwrite) as tmp:
            yield tmp
    except FileExistsError as e:  # it appeared while we were writing
        raise ConversionError(f"output {path}: {e}") from e


# --------------------------------------------------------------------------------------------- folders

_WEIGHT_PATTERNS = (
    "{stem}.safetensors",
    "{stem}.safetensors.index.json",
    "{stem}.bin",
    "{stem}.bin.index.json",
    "{stem}.fp16.safetensors",
    "{stem}.fp16.bin",
    # diffusers' naming for sharded fp16 variants
    "{stem}.safetensors.index.fp16.json",
    "{stem}.bin.index.fp16.json",
)


def find_weights_file(folder: str | os.PathLike, stem: str | Sequence[str]) -> Path:
    """The weights file of a diffusers/transformers model folder, in order of preference.

    `stem` is `diffusion_pytorch_model` (unet, vae, controlnet) or, for transformers, `("model",
    "pytorch_model")`. fp32 files beat fp16 variants; safetensors beats pickles within the same precision.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"no such folder: {folder}")
    stems = [stem] if isinstance(stem, str) else list(stem)
    candidates = [pattern.format(stem=s) for pattern in _WEIGHT_PATTERNS for s in stems]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise ConversionError(
        f"no weights file in {folder}: looked for {', '.join(candidates)}; the folder holds "
        + (key_list(present, noun="file") if present else "nothing")
    )


# --------------------------------------------------------------------------------------------- messages


def _brief(e: BaseException, limit: int = 200) -> str:
    """First line of an underlying error, shortened: torch's messages run to paragraphs."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def key_list(keys: Sequence[str], limit: int = 20, noun: str = "key") -> str:
    """`N key(s): a, b, ... and K more`: the one way converters list keys (or files) in an error."""
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {noun}(s): " + ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------------------------- memory


def release_memory() -> None:
    """Free what a finished conversion step dropped and hand it back to the OS before the next step reads.

    gc breaks reference cycles; malloc_trim returns the freed pages glibc keeps in its per-thread arenas
    (tensorstore's reader threads allocate there, and the main thread's next allocations cannot reuse them).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        pass


# --------------------------------------------------------------------------------------------- streaming

# safetensors dtype names <-> numpy dtypes (bf16 through ml_dtypes)
_SAFETENSORS_DTYPES = {
    "BF16": _BFLOAT16,
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NUMPY_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# A shard is reopened after this many bytes were read from it: safe_open maps the whole file, and every
# page a read touched stays resident (and counts as the process's memory) until the mapping is closed.
_REOPEN_BYTES = 256 * 2**20


class SafetensorsWeights:
    """The tensors of one .safetensors file or of a `*.safetensors.index.json` and its shards, read lazily.

    Opening reads only the headers: every shard must exist and be a complete safetensors file, every tensor
    the index lists must be in the shard it names, and no shard may hold a tensor the index does not list
    or that another shard holds too. Names, shapes and dtypes are then known without reading any data, so
    a converter can check a whole model before reading it; `tensors()` hands out one tensor at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"no such file: {self.path}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.files: dict[str, Path] = {}
        if self.path.name.endswith(".safetensors.index.json"):
            self._read_index()
        elif self.path.suffix == ".safetensors":
            self._read_header(self.path, expected=None)
        else:
            raise ConversionError(
                f"{self.path}: expected a .safetensors file or a *.safetensors.index.json shard index"
            )
        if not self.shapes:
            raise ConversionError(f"{self.path} contains no tensors")

    @property
    def shard_files(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shapes[key], dtype=np.int64)) * self.dtypes[key].itemsize

    def _read_index(self) -> None:
        index = read_json(self.path, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(
                f"cannot read shard index {self.path}: 'weight_map' is empty or not a mapping"
            )
        by_shard: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name:
                raise ConversionError(f"{self.path}: tensor {key!r} names shard {name!r}, not a file name")
            by_shard.setdefault(name, []).append(key)
        _check_shard_numbering(self.path, sorted(by_shard))
        for name in sorted(by_shard):  # every listed file first: a missing one is the likelier mistake
            shard = self.path.parent / name
            if not shard.is_file():
                raise ConversionError(
                    f"no such file: {shard} (a shard listed in {self.path} for "
                    f"{key_list(by_shard[name], limit=3, noun='tensor')})"
                )
        for name in sorted(by_shard):
            self._read_header(self.path.parent / name, expected=set(by_shard[name]))

    def _read_header(self, file: Path, expected: set[str] | None) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="np") as f:
                header = {}
                for key in f.keys():
                    view = f.get_slice(key)
                    header[key] = (tuple(view.get_shape()), view.get_dtype())
        except Exception as e:
            raise ConversionError(
                f"cannot read {file}: it is truncated or not a safetensors checkpoint ({_brief(e)})"
            ) from e
        if expected is not None:
            absent = sorted(expected - set(header))
            if absent:
                raise ConversionError(
                    f"{self.path} lists tensors that {file.name} does not contain: {key_list(absent)}"
                )
            extra = sorted(set(header) - expected)
            if extra:
                raise ConversionError(
                    f"{file} holds tensors that {self.path.name} does not list: {key_list(extra)}"
                )
        for key, (shape, dtype) in header.items():
            if key in self.files:
                raise ConversionError(f"tensor {key!r} is in both {self.files[key]} and {file}")
            if dtype not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{file}: tensor {key!r} has unsupported dtype {dtype}")
            self.shapes[key], self.dtypes[key], self.files[key] = shape, _SAFETENSORS_DTYPES[dtype], file

    def tensors(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for `keys` (default: all), shard by shard, each array in its stored dtype.

        Each array is a fresh copy (not a view of the file), so the caller may keep it; at most about
        _REOPEN_BYTES of file pages are mapped at any time.
        """
        from safetensors import safe_open

        wanted = list(self.shapes) if keys is None else list(keys)
        unknown = [k for k in wanted if k not in self.files]
        if unknown:
            raise ConversionError(f"{self.path} holds no tensors named {key_list(unknown)}")
        for file in self.shard_files:
            names = [k for k in wanted if self.files[k] == file]
            start = 0
            while start < len(names):
                try:
                    with safe_open(str(file), framework="np") as f:
                        read = 0
                        while start < len(names) and (read == 0 or read < _REOPEN_BYTES):
                            key = names[start]
                            yield key, f.get_tensor(key)
                            read += self.nbytes(key)
                            start += 1
                except ConversionError:
                    raise
                except Exception as e:
                    raise ConversionError(f"cannot read {file}: {_brief(e)}") from e


def _check_shard_numbering(index: Path, names: list[str]) -> None:
    """`stem-0000k-of-0000n.safetensors` names must cover 1..n: a missing k means a shard the index forgot."""
    import re

    numbered = [re.fullmatch(r".*-(\d+)-of-(\d+)\.safetensors", n) for n in names]
    if not numbered or not all(numbered):
        return
    totals = {int(m.group(2)) for m in numbered}
    if len(totals) != 1:
        raise ConversionError(f"{index} names shards of different series: {', '.join(names)}")
    total = totals.pop()
    absent = sorted(set(range(1, total + 1)) - {int(m.group(1)) for m in numbered})
    if absent:
        raise ConversionError(
            f"{index} lists no tensors in shard(s) {', '.join(f'{k} of {total}' for k in absent)}: "
            "the index does not belong to these shards"
        )


def find_safetensors_weights(folder: str | os.PathLike, stem: str) -> SafetensorsWeights:
    """A model folder's `stem.safetensors` or `stem.safetensors.index.json` + shards, opened lazily.

    Shards without their index and pickled weights (.bin) are refused with a message saying so.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"no such folder: {folder}")
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors"):
        if (folder / name).is_file():
            return SafetensorsWeights(folder / name)
    shards = sorted(p.name for p in folder.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        raise ConversionError(
            f"{folder} holds the shards {', '.join(shards)} but not their index {stem}.safetensors.index.json"
        )
    present = sorted(p.name for p in folder.iterdir())
    raise ConversionError(
        f"no safetensors weights in {folder}: looked for {stem}.safetensors and {stem}.safetensors.index.json"
        " (pickled .bin weights are not streamed: re-save them as safetensors); the folder holds "
        + (key_list(present, noun="file") if present else "nothing")
    )


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '10KB' / '1GiB' / a plain byte count -> bytes (diffusers' max_shard_size style)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise ConversionError(f"cannot read the size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into shards of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, n in sizes.items():
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current:
        shards.append(current)
    return shards


def write_sharded_safetensors(
    tensors: dict[str, np.ndarray],
    folder: str | os.PathLike,
    stem: str,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write `tensors` as diffusers/transformers do: one `stem.safetensors`, or shards
    `stem-0000k-of-0000n.safetensors` plus `stem.safetensors.index.json` when they exceed max_shard_bytes.

    Streams: each tensor is written straight from its buffer and then removed from `tensors` (the dict is
    emptied), so the caller's memory shrinks as the files grow. Every file appears atomically.
    """
    specs = {}
    for key, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise ConversionError(f"cannot write {folder}: tensor {key!r} is a {type(value).__name__}")
        specs[key] = (value.dtype, tuple(value.shape))
    return write_sharded_safetensors_from(specs, tensors.pop, folder, stem, max_shard_bytes, metadata)


def write_sharded_safetensors_from(
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    fetch: Callable[[str], np.ndarray],
    folder: str | os.PathLike,
    stem: str,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """`write_sharded_safetensors` for tensors made on demand: `specs` gives each name's (dtype, shape) in
    file order, `fetch(name)` the array itself when its turn comes (so a writer never holds more than one)."""
    folder = Path(folder)
    sizes = {}
    for key, (dtype, shape) in specs.items():
        if np.dtype(dtype) not in _NUMPY_TO_SAFETENSORS:
            raise ConversionError(
                f"cannot write {folder}: tensor {key!r} has dtype {dtype}, not a safetensors one"
            )
        sizes[key] = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    shards = plan_shards(sizes, max_shard_bytes)
    meta = dict(metadata or {"format": "pt"})
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    written = []
    for name, keys in zip(names, shards, strict=True):
        _write_safetensors_streaming({k: specs[k] for k in keys}, fetch, folder / name, meta)
        written.append(folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in sorted(keys)},
        }
        write_json(folder / f"{stem}.safetensors.index.json", index)
        written.append(folder / f"{stem}.safetensors.index.json")
    return written


def _write_safetensors_streaming(
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    fetch: Callable[[str], np.ndarray],
    path: Path,
    metadata: Mapping[str, str],
) -> None:
    """One safetensors file: an 8-byte header length, the JSON header (padded to 8 bytes), the raw data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _NUMPY_TO_SAFETENSORS[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors writer keeps it
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, (dtype, shape) in specs.items():
            value = np.ascontiguousarray(fetch(key))
            if value.dtype != np.dtype(dtype) or tuple(value.shape) != tuple(shape):
                raise ConversionError(
                    f"cannot write {path}: tensor {key!r} is {value.dtype} {value.shape}, "
                    f"announced as {np.dtype(dtype)} {tuple(shape)}"
                )
            f.write(value.reshape(-1).view(np.uint8).data)
            del value
