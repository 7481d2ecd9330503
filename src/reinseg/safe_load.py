"""Reading files that may come from anyone: weight files, checkpoints, YAML configurations.

Nothing in such a file may run code, import a module or exhaust the machine:

- PyTorch pickles (``.pth``/``.pt``/``.ckpt``, zip or legacy format) are read by torch's
  ``weights_only`` unpickler. The records training frameworks store next to the weights
  (mmengine's history buffers and configs, numpy arrays in its message hub, ``argparse``
  namespaces of timm/DeiT/MAE training scripts; :data:`FRAMEWORK_GLOBALS`) are allowed *by
  name* and become inert :class:`FrameworkRecord` objects: their contents are dropped, their module is never imported.
  Any other global is refused with the file and the global named, also those that torch and
  ``torch.distributed`` add to the allow-list process-wide (exceptions, ``DeviceMesh``).
- TorchScript archives (OpenAI's CLIP releases) are read as data: their ``data.pkl`` is
  unpickled with an allow-list (tensors, ``OrderedDict``, the archive's own ``__torch__`` module
  records) and tensors come from the archive's storages. ``torch.jit.load`` is never called, so
  no TorchScript ``__setstate__`` runs.
- YAML is read with the safe loader, at most :data:`MAX_YAML_ALIASES` aliases, and at most
  :data:`MAX_NODES` values once aliases are expanded (an alias bomb of a few hundred bytes
  would otherwise expand to billions of values in the code that walks the result).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a torch file is read: reading YAML needs none of it
    from torch import Tensor

__all__ = [
    "FrameworkRecord",
    "FRAMEWORK_GLOBALS",
    "MAX_NODES",
    "MAX_YAML_ALIASES",
    "UnsafeFileError",
    "count_nodes",
    "load_torch_file",
    "load_yaml",
]

# At most this many values in one configuration (or one value of an official config), counted
# with shared references expanded.
MAX_NODES = 1_000_000
MAX_YAML_ALIASES = 256
# A configuration is a few kilobytes (the official-config reader takes at most 1 MiB too).
MAX_YAML_CHARACTERS = 2**20


class UnsafeFileError(ValueError):
    """A file asks for something that could run code; the message names the file and what it asked for."""


class FrameworkRecord:
    """Stands for an object of a training framework's class stored beside the weights; keeps nothing."""

    def __new__(cls, *args: object, **kwargs: object):
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# Globals that training checkpoints hold besides tensors. Each is replaced by an inert record.
_NUMPY_DTYPES = (
    "Bool Int8 Int16 Int32 Int64 UInt8 UInt16 UInt32 UInt64 Byte UByte Short UShort Int UInt Long ULong "
    "LongLong ULongLong Float16 Float32 Float64 LongDouble Complex64 Complex128 CLongDouble Object Bytes Str "
    "Void DateTime64 TimeDelta64 StringDType"
).split()
FRAMEWORK_GLOBALS: tuple[str, ...] = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "mmengine.config.config.ConfigDict",
    "mmengine.config.config.Config",
    "argparse.Namespace",
    # mmengine's HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, "mean"):
    # here getattr is a record too, so it looks nothing up.
    "builtins.getattr",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    *(f"numpy.dtypes.{name}" if name.endswith("DType") else f"numpy.dtypes.{name}DType" for name in _NUMPY_DTYPES),
)
_RECORD_CLASSES = [(type(name.rsplit(".", 1)[1], (FrameworkRecord,), {}), name) for name in FRAMEWORK_GLOBALS]


def damaged_record(path: str | Path) -> str | None:
    """What is damaged in the zip file ``path`` (a record whose bytes do not match its CRC, or
    that cannot be read), None when every record is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    # torch.serialization.set_crc32_options(False) writes none: not checkable.
                    continue
                try:
                    with archive.open(info) as record:
                        while record.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return f"its record {info.filename} is damaged (its bytes do not match its CRC)"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"it is damaged ({_first_line(err)})"
    return None


def load_torch_file(path: str | Path, what: str = "file", mmap: bool = False, verify: bool = False) -> Any:
    """Read a PyTorch file without running anything it holds.

    Args:
        path: a ``torch.save`` file (zip or legacy format) or a TorchScript archive.
        what: what the file should be, for error messages (``"checkpoint"``, ``"weight file"``).
        mmap: memory-map the tensors (zip files): only what is touched is read.
        verify: check every record of a zip file against its CRC first (torch does not: bytes
            damaged inside a tensor load as other numbers). Reads the whole file.
    Returns:
        The unpickled object; framework records in it are :class:`FrameworkRecord` instances.
        From a TorchScript archive: ``{name: tensor}`` of its modules' tensors.
    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the file needs a global outside the allow-list (named in the message).
        ValueError: the file is not a PyTorch file (e.g. an image) or is corrupt.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _refuse_compressed_entries(path, what)
        if verify:
            damaged = damaged_record(path)
            if damaged is not None:
                raise ValueError(f"could not read {what} {path}: {damaged}")
    if is_zip and _is_torchscript(path):
        return _read_torchscript(path)
    with open(path, "rb") as file:
        if not is_zip and file.read(1) != b"\x80":  # every torch.save file is a zip or starts with a pickle
            raise ValueError(f"{path} is not a {what} (not a file written by torch.save)")
    try:
        with _only_record_globals():
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(path, err)
        if refused is not None:
            raise UnsafeFileError(
                f"{path}: refused to read this {what}: it needs {refused}, which could run code; "
                "reinseg reads only tensors, containers and known training-framework records"
            ) from None
        raise ValueError(f"could not read {what} {path}: {_first_line(err)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"could not read {what} {path}: {_first_line(err)}") from None
    if count_nodes(loaded) > MAX_NODES:
        # Lists holding themselves, or nested twice over 40 levels (a 2 kB file), took every walk
        # over the value forever.
        raise ValueError(
            f"{path}: refused to read this {what}: it holds more than {MAX_NODES:,} values once its shared "
            "containers are written out, or a container that holds itself"
        )
    _refuse_stretched_tensors(loaded, path, what)
    return loaded


# torch.save and torch.jit.save store tensors uncompressed (torch.jit.save deflates its code). A
# deflated record expands up to about 1000 times (zeros): a 20 MB file would fill 20 GB as read.
MAX_EXPANSION = 16


def _refuse_compressed_entries(path: Path, what: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"could not read {what} {path}: {err}") from None
    compressed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    for entry in compressed:
        if "/data/" in f"/{entry.filename}":
            raise ValueError(
                f"{path}: refused to read this {what}: its tensor record {entry.filename} is compressed "
                f"({entry.compress_size:,} bytes for {entry.file_size:,}); PyTorch stores tensors uncompressed"
            )
    # Other records (TorchScript's code and debug records are deflated) together, not one by one:
    # 64 records of 1 MiB each made 75 kB expand to 64 MiB.
    expanded, stored = sum(e.file_size for e in compressed), sum(e.compress_size for e in compressed)
    if expanded > max(MAX_EXPANSION * stored, 2**24):
        raise ValueError(
            f"{path}: refused to read this {what}: its compressed records expand from {stored:,} to {expanded:,} bytes"
        )


@contextlib.contextmanager
def _only_record_globals():
    """torch's weights-only reading with the framework records as the only added globals.

    Importing torch and ``torch.distributed`` (Lightning does) registers more safe globals
    process-wide: every built-in exception, DTensor's records and ``DeviceMesh``, whose
    construction from a file's arguments starts a process group (a connection to the configured
    master). They are set aside while a file is read and put back after (process-wide state: a
    file is read by one thread at a time)."""
    import torch

    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(_RECORD_CLASSES)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)


# A tensor may view its storage with zero strides: one stored float can claim a (1, 1370, 4M)
# tensor, which the first copy (a position-embedding resize, a clone) makes real. Views larger
# than their storage are refused above this size; small broadcast buffers stay readable.
MAX_STRETCHED_BYTES = 64 * 2**20


def _stretched(tensor: Tensor) -> bool:
    nbytes = tensor.numel() * tensor.element_size()
    return nbytes > MAX_STRETCHED_BYTES and nbytes > tensor.untyped_storage().nbytes()


def _refuse_stretched_tensors(loaded: object, path: Path, what: str) -> None:
    """Raise ValueError for a tensor in ``loaded`` (dicts, lists, tuples) that views more memory
    than its file stores (:data:`MAX_STRETCHED_BYTES`)."""
    import torch

    stack, seen = [loaded], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if _stretched(item):
                raise ValueError(
                    f"{path}: refused to read this {what}: a tensor of shape {tuple(item.shape)} views "
                    f"{item.untyped_storage().nbytes():,} stored bytes (zero strides), "
                    f"{item.numel() * item.element_size():,} bytes once copied"
                )
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _first_line(err: BaseException) -> str:
    """The cause in torch's message, without its advice to load with ``weights_only=False``."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return text[0] if text else type(err).__name__


def _refused_globals(path: Path, err: Exception) -> str | None:
    """The globals the weights-only reader refused, or ``None`` when ``err`` is about something else."""
    import torch

    message = str(err)
    # (torch names no global for those it knows but reinseg sets aside: "must be imported to load")
    if not any(sign in message for sign in ("GLOBAL", "unrecognized function", "allowlisted", "must be imported")):
        return None
    try:
        allowed = set(FRAMEWORK_GLOBALS)
        with _only_record_globals():  # what torch registered process-wide counts as unsafe here too
            names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
    except Exception:  # legacy files: get_unsafe_globals_in_checkpoint reads zip files only
        names = []
    if names:
        return "the Python global" + ("s " if len(names) > 1 else " ") + ", ".join(sorted(names)[:8])
    first = _first_line(err)
    if "GLOBAL " in first:
        return "the Python global " + first.split("GLOBAL ", 1)[1].split(" ", 1)[0]
    return "an object that is not data (" + first + ")"


# ---------------------------------------------------------------------------------------------
# TorchScript archives, read as data


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _ScriptRecord:
    """An object of a TorchScript class (a module): keeps the attributes it was pickled with."""

    def __setstate__(self, state: object) -> None:
        self.attributes = state if isinstance(state, dict) else {}


# torch's legacy storage classes, as TorchScript archives name them, and their element types.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *unused: object) -> Tensor:
    view = storage.as_strided(tuple(size), tuple(stride), offset)
    if _stretched(view):  # the archive's tensors are cloned: a stretched view would be made real
        raise pickle.UnpicklingError(f"a tensor of shape {tuple(view.shape)} views more than its archive stores")
    return view


class _ScriptDataUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, source: Path) -> None:
        super().__init__(file)
        self.archive, self.root, self.source = archive, root, source
        self.storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str):
        import torch

        if module.startswith("__torch__.") or module == "__torch__":
            return type(name, (_ScriptRecord,), {})
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return getattr(torch, _STORAGE_DTYPES[name])
        module = "builtins" if module == "__builtin__" else module
        raise UnsafeFileError(
            f"{self.source}: refused to read this TorchScript archive: it needs the Python global {module}.{name}"
        )

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise ValueError(f"{self.source}: unexpected storage record {pid!r:.80}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if storage.numel() < numel:
                raise ValueError(f"{self.source}: storage {key} is truncated")
            self.storages[key] = storage
        return self.storages[key]


def _read_torchscript(path: Path) -> dict[str, Tensor]:
    try:
        with zipfile.ZipFile(path) as archive:
            data_pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
            root = data_pkl.split("/", 1)[0]
            byteorder = next((n for n in archive.namelist() if n == f"{root}/byteorder"), None)
            if byteorder is not None and archive.read(byteorder).strip() not in (b"little", b""):
                raise ValueError(f"{path}: big-endian TorchScript archives are not supported")
            unpickler = _ScriptDataUnpickler(io.BytesIO(archive.read(data_pkl)), archive, root, path)
            module = unpickler.load()
    except (UnsafeFileError, ValueError):
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a readable TorchScript archive: {_first_line(err)}") from None
    tensors = _collect_tensors(module, path)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


# OpenAI's CLIP-L archive names about 400 tensors.
MAX_SCRIPT_TENSORS = 100_000


def _collect_tensors(module: object, source: Path) -> dict[str, Tensor]:
    """``{dotted name: tensor}`` of the module records' tensors, each distinct tensor cloned once.
    A record that contains itself, or more than :data:`MAX_SCRIPT_TENSORS` names (records shared
    over and over: 2 ** 40 paths in a 900-byte archive), is refused."""
    import torch

    out: dict[str, Tensor] = {}
    clones: dict[int, Tensor] = {}
    visited = 0
    stack: list[tuple[object, str, frozenset[int]]] = [(module, "", frozenset())]
    while stack:
        record, prefix, above = stack.pop()
        if not isinstance(record, _ScriptRecord):
            continue
        visited += 1
        if visited > MAX_SCRIPT_TENSORS:  # records shared over and over, with or without tensors
            raise ValueError(
                f"{source}: refused to read this TorchScript archive: more than {MAX_SCRIPT_TENSORS:,} module records"
            )
        if id(record) in above:
            raise ValueError(f"{source}: refused to read this TorchScript archive: a module contains itself")
        for name, value in getattr(record, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                if id(value) not in clones:
                    clones[id(value)] = value.clone()
                out[prefix + name] = clones[id(value)]
                if len(out) > MAX_SCRIPT_TENSORS:
                    raise ValueError(
                        f"{source}: refused to read this TorchScript archive: more than {MAX_SCRIPT_TENSORS:,} tensors"
                    )
            elif isinstance(value, _ScriptRecord):
                stack.append((value, f"{prefix}{name}.", above | {id(record)}))
    return out


# ---------------------------------------------------------------------------------------------
# Sizes and YAML


def count_nodes(value: Any, limit: int = MAX_NODES) -> int:
    """Number of values in ``value``: containers and their items, a shared reference counted each
    time it appears (as the value would hold it written out), a string or bytes as one value per
    64 characters more. Returns ``limit + 1`` as soon as the count passes ``limit``, and for a
    value that contains itself.

    Each distinct container is walked once and its size remembered, so the cost is that of the
    distinct objects (a YAML alias bomb: the few hundred of its text), not of the written-out size.
    """
    over = limit + 1

    def items(item: Any) -> list[Any]:
        if isinstance(item, dict):
            return [*item.keys(), *item.values()]
        if isinstance(item, (list, tuple, set, frozenset)):
            return list(item)
        return []

    def own(item: Any) -> int:
        return 1 + (len(item) // 64 if isinstance(item, (str, bytes)) else 0)

    sizes: dict[int, int] = {}  # id -> size of the containers walked (all alive: ``value`` holds them)
    walking = {id(value)}
    # [container, its items, the next item's index, the size so far], the innermost last.
    frames: list[list[Any]] = [[value, items(value), 0, own(value)]]
    while True:
        frame = frames[-1]
        if frame[3] > limit:
            return over  # a container's size counts in each one around it
        container, children, index = frame[0], frame[1], frame[2]
        if index < len(children):
            frame[2] += 1
            child = children[index]
            if id(child) in sizes:
                frame[3] += sizes[id(child)]
            elif id(child) in walking:
                return over  # it contains itself: no finite size
            elif grandchildren := items(child):
                walking.add(id(child))
                frames.append([child, grandchildren, 0, own(child)])
            else:
                frame[3] += own(child)
            continue
        frames.pop()
        walking.discard(id(container))
        sizes[id(container)] = frame[3]
        if not frames:
            return frame[3]
        frames[-1][3] += frame[3]


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML with the safe loader, bounded aliases and size.

    Raises:
        ValueError: naming ``source``, when the text has more than :data:`MAX_YAML_ALIASES`
            aliases or expands to more than :data:`MAX_NODES` values, is longer than
            :data:`MAX_YAML_CHARACTERS`, or gives a mapping's key twice; ``yaml.YAMLError`` when it
            is not YAML.
    """
    import yaml

    if len(text) > MAX_YAML_CHARACTERS:
        # Parsing builds every value before any count: 300,000 list items took 12 s and 213 MB.
        raise ValueError(f"{source}: {len(text):,} characters of YAML, more than {MAX_YAML_CHARACTERS:,}: refused")

    class _BoundedLoader(yaml.SafeLoader):
        aliases = 0
        checked: set[int] = set()

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                type(self).aliases += 1
                if type(self).aliases > MAX_YAML_ALIASES:
                    raise ValueError(f"{source}: more than {MAX_YAML_ALIASES} YAML aliases (*name): refused")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            # A key given twice: PyYAML keeps the last silently (a second `train:` section would
            # replace the first whole).
            if isinstance(node, yaml.MappingNode) and id(node) not in self.checked:
                # Once, as written: an anchored mapping with a merge is flattened in place when
                # first built, and an alias to it would see its merged keys as repeats.
                self.checked.add(id(node))
                lines: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue  # `<<: *defaults` merges may be overridden: that is what they are for
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise ValueError(
                            f"{source}: line {line}: the key {key!r} is given twice (first on line {lines[key]})"
                        )
                    lines[key] = line
            return super().construct_mapping(node, deep)

    data = yaml.load(text, Loader=_BoundedLoader)
    if count_nodes(data) > MAX_NODES:
        raise ValueError(f"{source}: expands to more than {MAX_NODES:,} values (YAML aliases?): refused")
    return data
