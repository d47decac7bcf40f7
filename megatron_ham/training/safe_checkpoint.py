"""Reading a checkpoint directory from elsewhere without running anything it contains.

A dist_checkpointing step dir is read by code we do not own: torch.distributed.checkpoint's
FileSystemReader `pickle.load`s `.metadata`, its load planner `torch.load(weights_only=False)`s
every BYTE_IO item inside the `__*.distcp` shards (our `rng_state`, the optimizer's common
state, every `*._extra_state`), and it follows each item's `relative_path`. Megatron-Core
0.16 also `torch.load`s `common.pt` (0.19 keeps that state as a BYTE_IO item). A planted
pickle in any of these runs with the trainer's rights. We do not patch torch or megatron;
`inspect_step_dir` reads every one of those inputs first, the way they would be read but with
an allow-list, and refuses the directory unless all of them are plain data:

  * `.metadata` is unpickled by `_MetadataUnpickler`, which can construct only the
    torch.distributed.checkpoint metadata classes (`METADATA_GLOBALS`), torch dtypes / Size /
    layout and Megatron-Core's two empty legacy classes; any other global is refused;
  * every storage entry must name a plain file of the step dir (no separators, no `..`, no
    symlink out), use no stream transforms, and lie inside the file (else: truncated);
  * every BYTE_IO item and `common.pt` must be a torch zip archive (not the legacy multi-pickle
    format, not TorchScript) whose `data.pkl` references only `PAYLOAD_GLOBALS` (tensors,
    storages, OrderedDict, dtypes, Size, device). It is scanned by `_PayloadScanner`, which
    constructs nothing: allowed globals become inert placeholders;
  * `metadata.json` must name the torch_dist / torch backends (other backends read other files).

Errors: `UnsafeCheckpoint` (something this tool never writes: the file and the offending global
or path are named; never fall back past it silently) and `CorruptCheckpoint` (unreadable or
truncated: the caller may fall back to an older checkpoint). Both are `CheckpointError`, a
ValueError whose message starts with the file's path.

What stays out of scope (docs/security.md): files changed between this inspection and the load
(an attacker writing into the directory while we read it), and tensor items, which torch itself
reads with `weights_only=True`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Dict, Iterator, List, Tuple

METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's global metadata (a pickle)
COMMON_FILE = "common.pt"  # Megatron-Core <= 0.18 common state (torch.save)
CONFIG_FILE = "metadata.json"  # Megatron-Core's CheckpointingConfig
MAX_METADATA_BYTES = 512 << 20  # tens of MB at thousands of ranks; far beyond: refuse
MAX_PAYLOAD_BYTES = 256 << 20  # BYTE_IO items are small Python objects (RNG, param groups)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the step dir and the file."""


class CorruptCheckpoint(CheckpointError):
    """Missing, truncated or unreadable files (a killed save, a full disk, a bad copy)."""


class UnsafeCheckpoint(CheckpointError):
    """Content this tool never writes: a foreign pickle global, a path out of the step dir."""


# ----------------------------------------------------------------------------- allow-lists
_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset(
    [(f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                        "TensorStorageMetadata", "BytesStorageMetadata",
                                        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.filesystem", "_StorageInfo")]
    + [(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                        "BytesIOWriteData")]
    + [("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("builtins", "set"), ("builtins", "frozenset"),
       # empty classes Megatron-Core keeps so that checkpoints of 0.15 unpickle (no code)
       ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
       ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")]
)
PAYLOAD_GLOBALS = frozenset([
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "Size"),
    ("torch", "device"), ("torch.storage", "UntypedStorage"), ("builtins", "set"),
    ("builtins", "frozenset"),
])
# records of a torch.save zip archive (anything else, e.g. TorchScript's constants.pkl, is refused)
_ZIP_RECORDS = {"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                ".data/version", ".data/serialization_id"}


def _torch_attr_kind(name: str) -> str:
    """'dtype' / 'storage' when `torch.<name>` is a dtype / a storage class, else ''."""
    import torch

    obj = getattr(torch, name, None) if name.isidentifier() and not name.startswith("_") else None
    if isinstance(obj, torch.dtype):
        return "dtype"
    if isinstance(obj, type) and name.endswith("Storage"):
        return "storage"
    return ""


def _refuse(path: str, what: str, module: str, name: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"{path}: {what} references the global {module}.{name}, which a megatron-ham checkpoint "
        "never contains; refusing to load it (it could run code)")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles `.metadata` constructing only METADATA_GLOBALS (plus torch dtypes)."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and _torch_attr_kind(name) == "dtype"):
            return super().find_class(module, name)
        raise _refuse(self.path, "the checkpoint metadata", module, name)

    def persistent_load(self, pid):
        raise UnsafeCheckpoint(f"{self.path}: the checkpoint metadata uses a persistent id "
                               f"({str(pid)[:80]!r}); DCP metadata never does")


class _Inert:
    """What an allowed global becomes while a payload is scanned: accepts and ignores anything."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass


class _PayloadScanner(pickle.Unpickler):
    """Walks a torch.save `data.pkl` and checks every global it names; constructs nothing."""

    def __init__(self, f, path: str, what: str):
        super().__init__(f)
        self.path, self.what = path, what

    def find_class(self, module, name):
        if (module, name) in PAYLOAD_GLOBALS or (module == "torch" and _torch_attr_kind(name)):
            return _Inert
        raise _refuse(self.path, self.what, module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"{self.path}: {self.what} has a persistent id {str(pid)[:80]!r} "
                                   "that is not a tensor storage")
        return _Inert()


def scan_torch_payload(raw: bytes, path: str, what: str) -> None:
    """Check bytes written by torch.save: a zip archive whose pickle names only PAYLOAD_GLOBALS.

    Raises UnsafeCheckpoint (foreign global, TorchScript, legacy format) or CorruptCheckpoint."""
    import torch

    if not raw.startswith(b"PK\x03\x04"):
        kind = "empty" if not raw else "not a torch zip archive (legacy or foreign format)"
        err = CorruptCheckpoint if not raw else UnsafeCheckpoint
        raise err(f"{path}: {what} is {kind}; this tool writes torch zip archives only")
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(raw))
        records = reader.get_all_records()
        data = reader.get_record("data.pkl")
    except Exception as e:  # truncated / damaged archive
        raise CorruptCheckpoint(f"{path}: {what} is a damaged zip archive ({e})") from None
    odd = sorted(r for r in records if r not in _ZIP_RECORDS and not (r.startswith("data/") and r[5:].isdigit()))
    if odd:
        raise UnsafeCheckpoint(f"{path}: {what} holds records {odd[:5]} that torch.save never writes "
                               "(TorchScript or foreign code); refusing to load it")
    try:
        _PayloadScanner(io.BytesIO(bytes(data)), path, what).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpoint(f"{path}: {what}: unreadable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- the step dir
def _plain_file(step_dir: str, rel: object, where: str) -> str:
    """`rel` as a regular file directly inside `step_dir` (UnsafeCheckpoint otherwise)."""
    if (not isinstance(rel, str) or not rel or rel in (".", "..") or "/" in rel or "\\" in rel
            or "\0" in rel or os.path.basename(rel) != rel):
        raise UnsafeCheckpoint(f"{where}: storage path {rel!r} is not a plain file name of the step "
                               "dir (paths may not leave the checkpoint)")
    full = os.path.join(step_dir, rel)
    if os.path.islink(full) or (os.path.exists(full) and
                                os.path.dirname(os.path.realpath(full)) != os.path.realpath(step_dir)):
        raise UnsafeCheckpoint(f"{full}: a symbolic link; checkpoint files must be regular files "
                               "inside the step dir")
    if not os.path.isfile(full):
        raise CorruptCheckpoint(f"{full}: missing (named by {where})")
    return full


def read_metadata(step_dir: str):
    """The DCP `Metadata` of `step_dir`, unpickled with the allow-list."""
    path = os.path.join(step_dir, METADATA_FILE)
    if not os.path.isfile(path) or os.path.islink(path):
        raise CorruptCheckpoint(f"{path}: missing (torch.distributed.checkpoint's metadata)")
    size = os.path.getsize(path)
    if size > MAX_METADATA_BYTES:
        raise UnsafeCheckpoint(f"{path}: {size} bytes, more than the {MAX_METADATA_BYTES} this tool accepts")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        md = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpoint(f"{path}: unreadable ({type(e).__name__}: {e}); truncated or damaged") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict) \
            or not isinstance(md.state_dict_metadata, dict):
        raise CorruptCheckpoint(f"{path}: not a torch.distributed.checkpoint Metadata object")
    return md


def _check_config(step_dir: str) -> None:
    path = os.path.join(step_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.loads(f.read(1 << 16))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing (Megatron-Core's checkpoint config)") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("sharded_backend") != "torch_dist" \
            or cfg.get("common_backend", "torch") != "torch":
        raise UnsafeCheckpoint(f"{path}: backends {cfg!r}; this tool writes and reads only "
                               "sharded_backend 'torch_dist' with common_backend 'torch'")


def storage_items(step_dir: str, md) -> Iterator[Tuple[str, str, int, int, bool]]:
    """(fqn, file path, offset, length, is_bytes) of every stored item, checked for confinement,
    transforms and bounds (each item must lie inside its file)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    where = os.path.join(step_dir, METADATA_FILE)
    sizes: Dict[str, int] = {}
    for index, info in md.storage_data.items():
        fqn = getattr(index, "fqn", None)
        rel = getattr(info, "relative_path", None)
        full = _plain_file(step_dir, rel, where)
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpoint(f"{where}: item {fqn!r} asks for stream transforms "
                                   f"{list(info.transform_descriptors)[:3]}; this tool writes none")
        off, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, length)):
            raise CorruptCheckpoint(f"{where}: item {fqn!r} has a bad offset/length ({off!r}, {length!r})")
        if full not in sizes:
            sizes[full] = os.path.getsize(full)
        if off + length > sizes[full]:
            raise CorruptCheckpoint(f"{full}: {sizes[full]} bytes, but item {fqn!r} needs bytes "
                                    f"[{off}, {off + length}) (truncated?)")
        yield fqn, full, off, length, isinstance(md.state_dict_metadata.get(fqn), BytesStorageMetadata)


def inspect_step_dir(step_dir: str) -> List[str]:
    """Check everything Megatron-Core / DCP would unpickle or open in `step_dir`; returns the
    data files the metadata names. Raises UnsafeCheckpoint / CorruptCheckpoint (see module doc)."""
    _check_config(step_dir)
    md = read_metadata(step_dir)
    files = set()
    for fqn, full, off, length, is_bytes in storage_items(step_dir, md):
        files.add(os.path.basename(full))
        if not is_bytes:
            continue  # tensors: torch reads them with weights_only=True
        if length > MAX_PAYLOAD_BYTES:
            raise UnsafeCheckpoint(f"{full}: object item {fqn!r} is {length} bytes; this tool's "
                                   f"objects are far below {MAX_PAYLOAD_BYTES}")
        with open(full, "rb") as f:
            f.seek(off)
            raw = f.read(length)
        scan_torch_payload(raw, full, f"object item {fqn!r}")
    common = os.path.join(step_dir, COMMON_FILE)
    if os.path.lexists(common):
        _plain_file(step_dir, COMMON_FILE, step_dir)
        if os.path.getsize(common) > MAX_PAYLOAD_BYTES:
            raise UnsafeCheckpoint(f"{common}: larger than {MAX_PAYLOAD_BYTES} bytes")
        with open(common, "rb") as f:
            scan_torch_payload(f.read(), common, "the common state")
    return sorted(files)


def diagnose_items(step_dir: str) -> str:
    """After a failed load: the first stored item that torch cannot read (file, item, error),
    or '' when every item reads. Reads the whole checkpoint; only used on failure."""
    import torch

    try:
        md = read_metadata(step_dir)
        for fqn, full, off, length, is_bytes in storage_items(step_dir, md):
            with open(full, "rb") as f:
                f.seek(off)
                raw = f.read(length)
            if is_bytes:
                scan_torch_payload(raw, full, f"object item {fqn!r}")
                continue
            try:
                torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as e:
                return f"{full}: tensor item {fqn!r} (bytes {off}..{off + length}) does not load ({e})"
    except CheckpointError as e:
        return str(e)
    return ""
