"""A transformers model directory and its adapter, merged one unit at a time, out of core.

``repc fuse BASE_DIR [--adapter ADAPTER_DIR] -o OUT_DIR`` (:mod:`repc.cli`) runs
:func:`merge_directory`, through :func:`merge_units`:

1. **Structure without weights.**  The architecture named by ``config.json`` is built with its
   parameters on the meta device (:func:`parameters_on_meta`; buffers such as rotary
   frequencies are computed by the model's own code, and those the checkpoint holds, such as a
   norm's running statistics, read from it); a PEFT adapter is attached, its small weights read.
2. **Units.**  The model's modules are cut into *units* (:func:`plan_units`): the largest
   modules whose weights fit the unit budget (by default the largest input file), that hold
   every weight they share, and that run a forward of their own.  A module that calls a PEFT
   layer is a unit whatever its size (the layer's base weight and adapter merge together, and
   the layer is replaced by a plain one inside it).  The weights outside
   every unit (a large module's own, weights two modules share) are read once and held.
3. **One forward on the example** (:class:`UnitRunner`).  When a unit is called, its weights
   are read from the checkpoint (:class:`CheckpointReader`: one ``pread`` per tensor, nothing
   left mapped); when it returns, it is compiled with :func:`repc.compile` on the inputs it was
   just given -- so verified on its own, on the example and on random inputs of other sizes --
   its merged weights are written under the checkpoint's own names (:class:`CheckpointWriter`),
   and its weights are dropped.  The forward goes on with the unit's original output: each unit
   is compiled on the inputs the original model gives it.  A unit called again is run, not
   compiled again.  A unit made and called as one compiled before takes that one's capture
   (:class:`repc.capture_export.CaptureCache`), with its own weights; the second such unit is
   compiled while the ops its merged weights come from are recorded, and each further one runs
   those ops on its own weights (:mod:`repc.replay`), checked as a whole against itself on
   the example and on random values of its shapes, and compiled where that fails.
4. **Copy-through.**  Every weight that no unit wrote (a module never called, the weights held
   outside units) is copied as it is.  The output's files are laid out before any tensor is
   written (the input's own, or cut at a shard size: a merge keeps every name, dtype and shape),
   so each tensor goes to its place as soon as its unit is done, and nothing is buffered.
5. **The whole-model check** (unless skipped, :func:`check_written`): the architecture is built
   again without weights and run on the example, unit by unit, from what was written; its
   output is compared with the original model's (step 3), at the compile's tolerance.

Peak memory: one unit's weights and its merged weights, the compile of that unit, and the
weights held outside units.  A merge that spans two units is not looked for (a budget as large
as the model makes the whole model one unit).  Everything is written into a temporary sibling
of the output and renamed at the end: a failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .capture_export import CaptureCache, reusing_captures
from .memory import FreedMemory
from .preserve import is_peft, is_peft_layer, keeping_parameter_names
from .replay import WeightProgram, WeightRecorder, check_replayed, module_weights, replay_key, with_weights

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
GARBAGE_BYTES = 256 * 2 ** 20  # units' weights compiled between two collections of the compiles' garbage
COMPILED_ONCE = "compiled once"  # a replay key's first unit: the next one like it is compiled and recorded


class OutOfCoreError(Exception):
    """A directory, an adapter or a model that cannot be read as given: one line."""


class MergeFailed(OutOfCoreError):
    """A unit, or the written model, that failed its check or cannot be written under the
    checkpoint's names: one line."""


# ----------------------------------------------------------------------------- reading and writing

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool,
                       "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory (one file, or shards and their index),
    each read from its file when asked for.

    A tensor is read with one ``pread`` into memory of its own: nothing stays mapped, so what
    this process holds is what it was given (a memory-mapped read leaves every page it touched
    counted in the process's resident memory for as long as the file stays open)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, SAFETENSORS_INDEX)
        if os.path.isfile(directory):  # (one safetensors file)
            directory, files, weight_map = os.path.dirname(directory) or ".", [os.path.basename(directory)], None
        elif os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, SAFETENSORS_SINGLE)):
            files, weight_map = [SAFETENSORS_SINGLE], None
        else:
            raise OutOfCoreError(f"{directory} holds no safetensors weights ({SAFETENSORS_SINGLE} or "
                                 f"{SAFETENSORS_INDEX}); a .bin checkpoint is not read out of core")
        self.directory = directory
        self._entries: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...], int, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise OutOfCoreError(f"{directory}: {name}, named in its index, is missing")
            for key, entry in _safetensors_header(path).items():
                self._entries[key] = (path, *entry)
        if weight_map is not None:
            missing = sorted(k for k, f in weight_map.items()
                             if k not in self._entries or os.path.basename(self._entries[k][0]) != f)
            if missing:
                raise OutOfCoreError(f"{directory}: {missing[0]} is not in {weight_map[missing[0]]}, where its index "
                                     "says it is")

    def keys(self) -> List[str]:
        return list(self._entries)

    def files(self) -> List[Tuple[str, List[str]]]:
        """(file name, its keys in the file's order) of each weight file."""
        files: Dict[str, List[str]] = {}
        for key, entry in self._entries.items():
            files.setdefault(os.path.basename(entry[0]), []).append(key)
        return list(files.items())

    def largest_file_bytes(self) -> int:
        """The size of the checkpoint's largest weight file."""
        return max(os.path.getsize(entry[0]) for entry in self._entries.values()) if self._entries else 0

    def nbytes(self, key: str) -> int:
        entry = self._entries[key]
        return entry[4] - entry[3]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        path, dtype, shape, begin, end = self._entries[key]
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            view, done = memoryview(data.numpy()), 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OutOfCoreError(f"{path} ends inside {key}: the file is truncated")
                done += n
        return data.view(dtype).reshape(shape)

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The floating-point dtype most of the checkpoint's bytes are in (the model runs in it;
        each tensor is written back in its own)."""
        sizes: Dict[torch.dtype, int] = {}
        for _, dtype, _, begin, end in self._entries.values():
            if dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + end - begin
        return max(sizes, key=sizes.get) if sizes else None


def _safetensors_header(path: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]]:
    """key -> (dtype, shape, first byte, end byte) of each tensor in a safetensors file."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise OutOfCoreError(f"{path} is not a safetensors file (it is shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(length))
        except ValueError as why:
            raise OutOfCoreError(f"{path} is not a safetensors file ({why})") from why
    start, size = 8 + length, os.path.getsize(path)
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise OutOfCoreError(f"{path}: {key} has a dtype repc does not read ({info.get('dtype')})")
        begin, end = (start + int(o) for o in info["data_offsets"])
        shape = tuple(int(n) for n in info["shape"])
        count = 1
        for n in shape:
            count *= n
        if end > size or end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise OutOfCoreError(f"{path}: {key}'s bytes do not fit its shape {list(shape)} and dtype, or the file")
        entries[key] = (dtype, shape, begin, end)
    return entries


Layout = List[Tuple[str, List[Tuple[str, torch.dtype, Tuple[int, ...]]]]]  # (file, its (key, dtype, shape)s)


def same_layout(reader: CheckpointReader) -> Layout:
    """The reader's own files and keys: the output shards as the input's."""
    return [(name, [(k, reader.dtype(k), reader.shape(k)) for k in keys]) for name, keys in reader.files()]


def cut_layout(reader: CheckpointReader, max_bytes: int) -> Layout:
    """The reader's keys, in its order, cut into files of at most ``max_bytes`` (a tensor larger
    than that in a file of its own), named as ``save_pretrained`` names them."""
    files: List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]] = [[]]
    size = 0
    for _, keys in reader.files():
        for k in keys:
            n = reader.nbytes(k)
            if files[-1] and size + n > max_bytes:
                files.append([])
                size = 0
            files[-1].append((k, reader.dtype(k), reader.shape(k)))
            size += n
    if len(files) == 1:
        return [(SAFETENSORS_SINGLE, files[0])]
    return [(f"model-{i + 1:05d}-of-{len(files):05d}.safetensors", keys) for i, keys in enumerate(files)]


WRITES_IN_FLIGHT = 256 * 2 ** 20  # bytes handed to the writing thread and not yet written


class CheckpointWriter:
    """A safetensors checkpoint whose keys, dtypes and shapes are known before any tensor is
    (a merge keeps the checkpoint's names and shapes): each file is created at its full size
    with its header, and each tensor written at its place when it comes, from its own memory.
    A thread of its own does the writing, so that the merge goes on meanwhile; at most
    ``in_flight`` bytes wait for it (the caller is held up beyond that).  :meth:`finish` checks
    that every key was written once and writes the index of several files."""

    def __init__(self, directory: str, layout: Layout, on_file: Optional[Callable[[str, int], None]] = None,
                 in_flight: int = WRITES_IN_FLIGHT):
        import struct
        from concurrent.futures import ThreadPoolExecutor

        names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items() if dtype is not None}
        self.directory, self.layout, self.on_file, self.in_flight = directory, layout, on_file, in_flight
        self._places: Dict[str, Tuple[int, int, torch.dtype, Tuple[int, ...]]] = {}
        self._left: Dict[int, List[Any]] = {}  # fd -> [its name, keys not yet written, its bytes]
        self._fds: List[int] = []
        self._pending: List[Tuple[Any, int, int]] = []  # (future, fd, bytes), oldest first
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repc-checkpoint-writer")
        self.total_bytes = 0
        self.written: set = set()
        try:
            for name, entries in layout:
                header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
                offset = 0
                for key, dtype, shape in entries:
                    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                    header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                    offset += size
                encoded = json.dumps(header, separators=(",", ":")).encode()
                encoded += b" " * (-len(encoded) % 8)  # (the data starts 8-byte aligned, as safetensors writes it)
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds.append(fd)
                os.write(fd, struct.pack("<Q", len(encoded)) + encoded)
                os.ftruncate(fd, 8 + len(encoded) + offset)
                for key, dtype, shape in entries:
                    begin = 8 + len(encoded) + header[key]["data_offsets"][0]
                    self._places[key] = (fd, begin, dtype, tuple(shape))
                self._left[fd] = [name, len(entries), offset]
                self.total_bytes += offset
        except BaseException:
            self.close()
            raise

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._places:
            raise MergeFailed(f"{key} is not a weight of the checkpoint")
        fd, begin, dtype, shape = self._places[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergeFailed(f"the merged {key} is {list(tensor.shape)} {tensor.dtype}, the checkpoint's "
                              f"{list(shape)} {dtype}")
        if key in self.written:
            raise MergeFailed(f"{key} was written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        self.written.add(key)
        size = tensor.numel() * tensor.element_size()
        self._pending.append((self._thread.submit(_pwrite_all, fd, tensor, begin), fd, size))
        self._wait(self.in_flight)

    def _wait(self, limit: int) -> None:
        """Wait for the oldest writes until at most ``limit`` bytes are in flight; a failed
        write raises here.  Says which files are whole."""
        while self._pending and (sum(n for _, _, n in self._pending) > limit or self._pending[0][0].done()):
            future, fd, _ = self._pending.pop(0)
            future.result()
            left = self._left[fd]
            left[1] -= 1
            if left[1] == 0 and self.on_file is not None:
                self.on_file(left[0], left[2])

    def finish(self) -> List[str]:
        """The files written; every key must have been."""
        missing = [k for k in self._places if k not in self.written]
        if missing:
            raise MergeFailed(f"{missing[0]} was never written ({len(missing)} weight(s) missing)")
        self._wait(0)
        self.close()
        names = [name for name, _ in self.layout]
        if len(names) > 1:
            weight_map = {key: name for name, entries in self.layout for key, _, _ in entries}
            with open(os.path.join(self.directory, SAFETENSORS_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes},
                           "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return names

    def close(self) -> None:
        """Stop the writing thread (after the writes handed to it) and close the files."""
        self._thread.shutdown(wait=True)
        self._pending = []
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# ----------------------------------------------------------------------------- a model without weights

@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their
    buffers as their code computes them."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        held = module._parameters.get(name)
        if held is not None and held.device.type != "meta":
            module._parameters[name] = type(held)(held.to("meta"), requires_grad=held.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def architecture(config, trust_remote_code: bool):
    """The transformers class ``config.json`` names."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise OutOfCoreError("config.json names no architecture ('architectures' is missing)")
    cls = getattr(transformers, names[0], None)
    if cls is not None:
        return cls
    if not trust_remote_code:
        raise OutOfCoreError(f"config.json names {names[0]}, which transformers does not define: "
                             "pass --trust-remote-code to run the directory's own code")
    return transformers.AutoModelForCausalLM if names[0].endswith("ForCausalLM") else transformers.AutoModel


def weightless_model(config, cls, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """``cls`` built from ``config`` in ``dtype``, its parameters on the meta device, in eval mode
    (an Auto class, for a directory's own code, through ``from_config``)."""
    with parameters_on_meta():
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def attach_adapter(model: nn.Module, adapter_dir: str, device: str = "cpu") -> nn.Module:
    """``model`` (without weights) with the PEFT adapter of ``adapter_dir``, whose own weights
    are read and held (they are small); the base weights stay on the meta device."""
    import peft
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise OutOfCoreError(f"--adapter {adapter_dir}: no adapter_config.json there (PEFT's save_pretrained layout)")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise OutOfCoreError(f"--adapter {adapter_dir}: no adapter_model.safetensors there")
    base = {id(p) for p in model.parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (PEFT warns that the meta base weights are not loaded)
            wrapped = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, local_files_only=True)
        adapter = set()
        made: Dict[int, torch.Tensor] = {}  # (a buffer PEFT shares between layers, VeRA's projections: made once)
        for path, module in wrapped.named_modules(remove_duplicate=False):
            # the adapter's weights and buffers were made on the base's (meta) device
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) not in base:
                    if id(p) not in made:
                        made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
                    module._parameters[name] = made[id(p)]
                    adapter.add(f"{path}.{name}" if path else name)
            for name, b in list(module._buffers.items()):
                if b is not None and b.device.type == "meta":
                    if id(b) not in made:
                        made[id(b)] = torch.empty_like(b, device=device)
                    module._buffers[name] = made[id(b)]
        loaded = peft.set_peft_model_state_dict(wrapped, load_file(weights, device=str(device)))
    except (RuntimeError, ValueError, KeyError) as why:  # (load_state_dict's report: one line of it)
        lines = [ln.strip() for ln in str(why).splitlines() if ln.strip()]
        raise OutOfCoreError(f"--adapter {adapter_dir}: its weights do not fit the model "
                             f"({lines[1] if len(lines) > 1 else lines[0]})") from why
    unloaded = sorted(adapter & set(loaded.missing_keys))
    if loaded.unexpected_keys or unloaded or not adapter:
        what = (loaded.unexpected_keys or [])[:1] or [f"{k} is not in it" for k in unloaded[:1]] or \
            ["no adapter layer was attached"]
        raise OutOfCoreError(f"--adapter {adapter_dir}: its weights do not fit the model ({what[0]})")
    return wrapped.eval()


# ----------------------------------------------------------------------------- units

@dataclass
class UnitPlan:
    """Where each weight comes from and which modules run as units."""

    units: Dict[int, str]  # id(module) -> its path in the architecture ("model.layers.3")
    keys: Dict[Tuple[int, str], str]  # (id(module), parameter name) -> checkpoint key, for weights on meta
    held: List[Tuple[nn.Module, str]]  # weights read once and held (outside every unit)
    budget: int


def _callable(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def plan_units(model: nn.Module, names: Dict[Tuple[int, str], str], budget: int) -> UnitPlan:
    """Units of ``model`` (the architecture, with any adapter layers in it) under ``budget``
    bytes of weights.  ``names``: (id(module), parameter name) -> checkpoint key of each weight
    the model reads from the checkpoint."""
    holders: Dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    units: Dict[int, str] = {}
    held: List[Tuple[nn.Module, str]] = []

    def weights(module: nn.Module) -> Tuple[int, bool]:
        """(bytes of its checkpoint weights, whether it holds every holder of each weight it holds)"""
        size, counts = 0, {}
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is None:
                    continue
                if counts.get(id(p)) is None and (id(sub), name) in names:
                    size += p.numel() * p.element_size()
                counts[id(p)] = counts.get(id(p), 0) + 1
        return size, all(holders[i] == n for i, n in counts.items())

    def visit(path: str, module: nn.Module) -> None:
        size, whole = weights(module)
        if size == 0 and not any(True for _ in module.parameters()):
            return
        leaf = not any(True for c in module.children() if any(True for _ in c.parameters()))
        # a PEFT layer merged on its own is a module replaced at the root, which keeps its class:
        # the module that calls it is the unit (or the layer itself, where nothing calls it alone)
        indivisible = leaf or is_peft_layer(module) or any(is_peft_layer(c) for c in module.children())
        if _callable(module) and whole and (size <= budget or indivisible) and \
                not (is_peft(module) and not is_peft_layer(module)):  # (not the PEFT model or its tuner)
            units[id(module)] = path
            return
        held.extend((module, name) for name, p in module._parameters.items()
                    if p is not None and (id(module), name) in names)
        for child_name, child in module.named_children():
            visit(f"{path}.{child_name}" if path else child_name, child)

    visit("", model)
    return UnitPlan(units=units, keys=dict(names), held=held, budget=budget)


class SavedNames:
    """Which checkpoint key each of the architecture's state-dict names is saved under.

    Mostly the same name; transformers also renames some on load (ViT's checkpoints say
    ``encoder.layer.0.attention.attention.query``, its modules ``layers.0.attention.q_proj``)
    and back on save: those renamings are transformers' own (its conversion mapping, applied
    as ``from_pretrained`` applies it).  A checkpoint tensor that transformers converts rather
    than renames (split, concatenated) is refused: it is not read out of core."""

    def __init__(self, model: nn.Module, reader: CheckpointReader):
        rename = _transformers_renaming(model)
        self.checkpoint_key: Dict[str, str] = {}
        for key in reader.keys():
            self.checkpoint_key[rename(key) if rename else key] = key

    def get(self, name: str) -> Optional[str]:
        return self.checkpoint_key.get(name)

    def under(self, prefix: str) -> Dict[str, str]:
        return {n: k for n, k in self.checkpoint_key.items() if n.startswith(prefix)}


def _transformers_renaming(model: nn.Module) -> Optional[Callable[[str], str]]:
    """checkpoint key -> the model's name for it, by transformers' conversion mapping; None
    where transformers has none (an older version, a model of another library)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
    except Exception:  # (its internals: where they are not as read here, names are taken as they are)
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    prefix = getattr(model, "base_model_prefix", None)
    meta = dict.fromkeys(model.state_dict())

    def rename(key: str) -> str:
        new, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is not None:
            raise OutOfCoreError(f"the checkpoint stores {key} in another layout than the model's (transformers "
                                 f"converts it on load: {converted}), which is not read out of core")
        return new

    return rename


def checkpoint_names(model: nn.Module, saved: SavedNames) -> Dict[Tuple[int, str], str]:
    """(id(module), parameter name) -> checkpoint key for each parameter of the architecture
    ``model`` (before an adapter is attached); a parameter the checkpoint lacks is an error,
    except a tied one whose other name it has."""
    names: Dict[Tuple[int, str], str] = {}
    by_param: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    for path, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is not None:
                by_param.setdefault(id(p), []).append((module, name, f"{path}.{name}" if path else name))
    for places in by_param.values():
        keys = [saved.get(full) for _, _, full in places if saved.get(full) is not None]
        if not keys:
            raise OutOfCoreError(f"the checkpoint has no weight {places[0][2]}, which the config's architecture has")
        for module, name, _ in places:
            names[(id(module), name)] = keys[0]
    return names


def load_buffers(model: nn.Module, reader: CheckpointReader, saved: SavedNames, device: str = "cpu") -> int:
    """Give each buffer of ``model`` that the checkpoint holds (a norm's running statistics) its
    value there; they are small, and held for the whole run.  Returns how many."""
    count = 0
    for path, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            key = saved.get(f"{path}.{name}" if path else name)
            if buffer is None or key is None:
                continue
            if reader.shape(key) != tuple(buffer.shape):
                raise OutOfCoreError(f"the checkpoint's {key} has shape {list(reader.shape(key))}, the model "
                                     f"{list(buffer.shape)}")
            module._buffers[name] = reader.read(key).to(device=device, dtype=buffer.dtype)
            count += 1
    return count


class UnitRunner:
    """Runs the model on one call, reading each unit's weights when it is called and dropping
    them when it returns; ``on_unit(path, module, args, kwargs, output)`` is called on each unit's
    first return, its weights still there."""

    def __init__(self, model: nn.Module, plan: UnitPlan, reader: CheckpointReader, device: str = "cpu",
                 on_unit: Optional[Callable[[str, nn.Module, tuple, dict, Any], None]] = None,
                 perturbed: Optional[int] = None):
        """``perturbed``: a seed; each weight read is then moved by an ulp, times ``1 +- eps`` at
        random (:func:`repc.verify.check.perturbed_copies`, one unit at a time)."""
        self.model, self.plan, self.reader, self.device, self.on_unit = model, plan, reader, device, on_unit
        self.perturbed = None if perturbed is None else torch.Generator().manual_seed(perturbed)
        self.active: Optional[nn.Module] = None
        self.done: set = set()
        self.busy = False
        self.freed = FreedMemory()

    def _read(self, module: nn.Module, name: str) -> None:
        p = module._parameters[name]
        if p is None or p.device.type != "meta":
            return
        key = self.plan.keys[(id(module), name)]
        shape = self.reader.shape(key)
        if shape != tuple(p.shape):
            raise OutOfCoreError(f"the checkpoint's {key} has shape {list(shape)}, the config's model "
                                 f"{list(p.shape)}")
        value = self.reader.read(key).to(device=self.device, dtype=p.dtype)
        if self.perturbed is not None and value.is_floating_point():
            sign = torch.randint(0, 2, value.shape, generator=self.perturbed) * 2 - 1
            value.mul_(1 + sign.to(value.dtype) * torch.finfo(value.dtype).eps)
        module._parameters[name] = nn.Parameter(value, requires_grad=False)

    def _read_unit(self, unit: nn.Module) -> None:
        for module in unit.modules():
            for name in list(module._parameters):
                if (id(module), name) in self.plan.keys:
                    self._read(module, name)

    def _drop_unit(self, unit: nn.Module) -> None:
        for module in unit.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and (id(module), name) in self.plan.keys and p.device.type != "meta":
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                    # (glibc keeps freed weights in its heap, and the next unit's reads may not fit
                    # there: resident memory grew by a layer per unit in a pass without compiles)
                    self.freed.dropped_bytes(p.numel() * p.element_size())

    def run(self, args: tuple, kwargs: Dict[str, Any]) -> Any:
        for module, name in self.plan.held:
            self._read(module, name)
        units = self.plan.units

        def before(module, args, kw):
            if self.active is None and id(module) in units:
                self.active = module
                self._read_unit(module)

        def after(module, args, kw, output):
            if self.active is not module or self.busy:
                return  # (a call inside another unit, or the unit's own calls while it is compiled)
            try:
                if self.on_unit is not None and id(module) not in self.done:
                    self.done.add(id(module))
                    self.busy = True
                    self.on_unit(units[id(module)], module, args, kw, output)
            finally:
                self.busy = False
                self._drop_unit(module)
                self.active = None

        hooks = []
        try:
            for module in self.model.modules():
                if id(module) in units:
                    hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
                    hooks.append(module.register_forward_hook(after, with_kwargs=True))
            with torch.no_grad():
                try:
                    return self.model(*args, **kwargs)
                except NotImplementedError as why:  # (a meta weight read outside its module's call)
                    if "meta" not in str(why):
                        raise
                    raise OutOfCoreError("the model reads a weight outside the call of the module that holds it, "
                                         "so it cannot be read unit by unit: raise --unit-size to the model's "
                                         "size to merge it in memory") from why
        finally:
            for h in hooks:
                h.remove()


# ----------------------------------------------------------------------------- merging

@dataclass
class UnitResult:
    path: str
    seconds: float
    rewrites: int
    merged_layers: List[str]
    max_deviation: float
    front_end: str
    replay: str = ""  # how the merged weights were computed where not by the unit's own compile (replay.py)


@dataclass
class MergeResult:
    units: List[UnitResult] = field(default_factory=list)
    copied: int = 0  # checkpoint weights written as they were (outside every unit called)
    files: List[str] = field(default_factory=list)
    bytes_written: int = 0
    check: Optional[Dict[str, Any]] = None  # the whole-model check: deviation, tolerance (None: skipped)
    seconds: float = 0.0
    unit_bytes: int = 0  # the budget the units were cut to

    @property
    def merged_layers(self) -> List[str]:
        return [path for unit in self.units for path in unit.merged_layers]

    def to_dict(self) -> Dict[str, Any]:
        return {"units": [vars(u) for u in self.units], "merged_layers": self.merged_layers,
                "weights_copied_unchanged": self.copied, "files": self.files, "bytes_written": self.bytes_written,
                "whole_model_check": self.check if self.check is not None else "skipped",
                "per_unit_checks": "each unit's compile verified it on the example and on random inputs",
                "unit_bytes": self.unit_bytes, "seconds": round(self.seconds, 2)}


def _unit_failure(path: str, fused: nn.Module) -> Optional[str]:
    from .api import adapter_layers_left

    report = fused.repc_report
    v = report.verification
    where = path or "the model"
    if v is not None and not v.ok:
        return f"{where}: verification failed on input {v.failing_input} (max deviation {v.max_deviation:.2e} > " \
               f"tolerance {v.tolerance:g}{'; ' + v.error if v.error else ''})"
    if report.rolled_back:
        return f"{where}: verification failed: every rewrite was rolled back"
    left = adapter_layers_left(fused)
    if left:
        first = f"{path}.{left[0][0]}" if path and left[0][0] else (left[0][0] or path)
        return f"the adapter is left unmerged in {len(left)} layer(s) ({first}: {left[0][1]}" + \
               (", ..." if len(left) > 1 else "") + "), so saving would write the adapter, not a merged model"
    return None


def _compile_unit(path: str, unit: nn.Module, args: tuple, kwargs: dict, captures: Optional[CaptureCache], *,
                  tolerance: Optional[float], cost: str) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(the compiled unit, None) or (None or the result, why it cannot be written): compiled
    with ``captures`` (a unit made and called as one compiled before is not exported again)."""
    import repc

    try:
        with warnings.catch_warnings(), reusing_captures(captures), keeping_parameter_names():
            warnings.simplefilter("ignore")  # (tracers' notes on specialized arguments: weights are kept)
            fused = repc.compile(unit, args, kwargs, tolerance=tolerance, progress=False, cost=cost)
    except repc.ReparamError as why:
        return None, f"{path or 'the model'}: {str(why).splitlines()[0]}"
    return fused, _unit_failure(path, fused)


def _unit_weights(path: str, fused: nn.Module, reader: CheckpointReader,
                  saved: SavedNames) -> Dict[str, torch.Tensor]:
    """The merged unit's weights by checkpoint key: every name the checkpoint has under
    ``path``, no other (a tied name the checkpoint lacks is dropped where its tensor is, or
    equals, one written: loading ties it again), each of the checkpoint's shape (and dtype,
    where the checkpoint mixes them)."""
    prefix = f"{path}." if path else ""
    expected = saved.under(prefix)
    got = {prefix + k: t for k, t in fused.state_dict().items()}
    kept = {n: t for n, t in got.items() if n in expected}

    def tied(t: torch.Tensor) -> bool:  # (the same tensor as one written, or a copy of it: a tied head)
        return any(t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() or
                   (t.shape == w.shape and t.dtype == w.dtype and torch.equal(t, w)) for w in kept.values())

    extra = [n for n, t in got.items() if n not in expected and not tied(t)]
    missing = sorted(set(expected) - set(got))
    if extra or missing:
        detail = f"{extra[0]} is not a weight of the checkpoint" if extra else f"it has no {missing[0]}"
        raise MergeFailed(f"the merged {path or 'model'} cannot be written under the checkpoint's names ({detail}): "
                          f"{fused.repc_report.output_note or 'its merge is not expressed in the architecture'}")
    weights = {}
    for n, t in kept.items():
        key = expected[n]
        if tuple(t.shape) != reader.shape(key):
            raise MergeFailed(f"the merged {n} has shape {list(t.shape)}, the checkpoint's {list(reader.shape(key))}")
        if t.dtype != reader.dtype(key) and t.is_floating_point() and reader.dtype(key).is_floating_point:
            t = t.to(reader.dtype(key))  # (a checkpoint of mixed dtypes keeps each tensor's)
        weights[key] = t
    return weights


@dataclass
class _Replayable:
    """What a unit like ``path`` needs to be merged without a compile: the ops of ``path``'s merged
    weights, and its compiled module's structure (weights on the meta device) with its report."""
    path: str
    program: WeightProgram
    template: nn.Module


def _recorded(path: str, fused: nn.Module, recorder: WeightRecorder) -> Tuple[Optional[_Replayable], str]:
    try:
        program, why = recorder.program(fused)
    except Exception as error:  # (an op recorded that does not run again: the units like it are compiled)
        program, why = None, f"running the ops recorded failed ({type(error).__name__}: {error})"
    if program is None:
        return None, why
    template = with_weights(fused, {n: torch.empty_like(t, device="meta") for n, t in module_weights(fused).items()})
    template.repc_report = fused.repc_report
    return _Replayable(path, program, template), ""


def _replayed_unit(kept: _Replayable, unit: nn.Module, args: tuple, kwargs: dict, output: Any,
                   tolerance: Optional[float]) -> Tuple[Optional[nn.Module], float, str]:
    """(the unit merged by ``kept``'s program, the check's deviation, "") or (None, ..., why not);
    ``output``: the unit's own on ``(args, kwargs)``."""
    try:
        weights = kept.program.run(module_weights(unit))
    except Exception as why:  # (an op that refuses this unit's weights: compiled instead)
        return None, float("inf"), f"{type(why).__name__}: {why}"
    fused = with_weights(kept.template, weights)
    dev, failure = check_replayed(fused, unit, args, kwargs, tolerance, expected=output)
    if failure is not None:
        return None, dev, failure
    report = copy.copy(kept.template.repc_report)
    report.verification = dataclasses.replace(report.verification, max_deviation=dev,
                                              inputs_checked=["example", "random values of its shapes"],
                                              inputs_skipped=[], within_noise=[])
    fused.repc_report = report
    return fused, dev, ""


def merge_units(model: nn.Module, plan: UnitPlan, reader: CheckpointReader, saved: SavedNames,
                writer: CheckpointWriter, args: tuple, kwargs: Dict[str, Any], *, device: str = "cpu",
                tolerance: Optional[float] = None, cost: str = "macs", replay: bool = True,
                note: Callable[[str], None] = lambda text: None) -> Tuple[Any, MergeResult]:
    """One forward of ``model`` on the example, unit by unit (:class:`UnitRunner`): each unit
    compiled and verified on the inputs it is given, its merged weights written by ``writer``
    under the checkpoint's names; then the weights no unit wrote, copied.  Returns the
    original's output on the example and what was merged.

    With ``replay``, units made and called alike (:func:`repc.replay.replay_key`: a language
    model's layers) are compiled twice, the second time recording the ops its merged weights
    come from (:class:`repc.replay.WeightRecorder`); each further one runs those ops on its own
    weights and is checked as a whole against itself (:func:`repc.replay.check_replayed`), and
    compiled where that fails."""
    result = MergeResult()
    count = len(plan.units)
    captures = CaptureCache()
    programs: Dict[Any, Any] = {}  # replay key -> COMPILED_ONCE, a _Replayable, or None (none kept)
    compiled = [0]  # bytes of the units compiled since garbage was last collected

    def merge_unit(path: str, unit: nn.Module, unit_args: tuple, unit_kwargs: dict, output: Any) -> None:
        began = time.perf_counter()
        key = replay_key(unit, unit_args, unit_kwargs) if replay else None
        kept = programs.get(key) if key is not None else None
        fused, replayed = None, ""
        if isinstance(kept, _Replayable):
            fused, _, why = _replayed_unit(kept, unit, unit_args, unit_kwargs, output, tolerance)
            replayed = f"the ops of {kept.path}'s merged weights, replayed" if fused is not None else \
                f"compiled: replaying {kept.path}'s failed ({why})"
        if fused is None:
            recorder = WeightRecorder(unit) if key is not None and kept == COMPILED_ONCE else None
            with recorder if recorder is not None else contextlib.nullcontext():
                fused, failure = _compile_unit(path, unit, unit_args, unit_kwargs, captures, tolerance=tolerance,
                                               cost=cost)
            reused = captures.took
            if failure is not None and reused:  # (the capture of a unit like it may not be this one's)
                fused, failure = _compile_unit(path, unit, unit_args, unit_kwargs, None, tolerance=tolerance,
                                               cost=cost)
                reused, recorder = False, None
            if failure is not None:
                raise MergeFailed(failure)
            if key is not None and key not in programs:
                programs[key] = COMPILED_ONCE
            elif recorder is not None:
                programs[key], why = _recorded(path, fused, recorder)
                replayed = "recorded for the units like it" if programs[key] is not None else \
                    f"not recorded for the units like it: {why}"
            del recorder
        else:
            reused = False
        for key, tensor in _unit_weights(path, fused, reader, saved).items():
            writer.write(key, tensor)
        report = fused.repc_report
        prefix = f"{path}." if path else ""
        merged = [prefix + sw.path if sw.path else path for sw in report.swaps
                  if sw.becomes not in ("unchanged", "not applied")]
        unit_result = UnitResult(path=path, seconds=round(time.perf_counter() - began, 3),
                                 rewrites=len(report.rewrites), merged_layers=merged,
                                 max_deviation=report.verification.max_deviation if report.verification else 0.0,
                                 front_end=report.front_end + (" (a capture of a unit like it, reused)"
                                                               if reused else ""), replay=replayed)
        result.units.append(unit_result)
        note(f"[{len(result.units)}/{count}] {path or 'the model'}: {len(report.rewrites)} rewrite(s), "
             f"{len(merged)} layer(s) merged ({unit_result.seconds:.1f} s)")
        del fused, report
        compiled[0] += sum(p.numel() * p.element_size() for p in unit.parameters())
        if compiled[0] >= GARBAGE_BYTES:  # (a compile's graphs are cycles, which hold the unit's weights)
            compiled[0] = 0
            gc.collect(1)
            FreedMemory().give_back()

    reference = UnitRunner(model, plan, reader, device, on_unit=merge_unit).run(args, kwargs)
    for key in reader.keys():  # weights no unit wrote, as they are
        if key not in writer.written:
            writer.write(key, reader.read(key))
            result.copied += 1
    return reference, result


def check_written(model: nn.Module, reader: CheckpointReader, budget: int, args: tuple, kwargs: Dict[str, Any],
                  reference: Any, tolerance: float, device: str = "cpu",
                  rounded_original: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """``model`` (the architecture, without weights) run unit by unit on the example from the
    checkpoint ``reader`` reads (what was written), against ``reference`` (the original's
    output); :class:`MergeFailed` where it is further than ``tolerance``.

    Beyond it, as the compile's own check does (:func:`repc.verify.check.compare`): where
    ``rounded_original()`` (the original run with its weights moved by an ulp) is itself that
    far from ``reference`` (rounding alone moves it: bfloat16 through many layers), the written
    model passes at most :data:`repc.verify.check.NOISE_FACTOR` times as far."""
    from .verify.check import NOISE_FACTOR, deviation

    saved = SavedNames(model, reader)
    load_buffers(model, reader, saved, device)
    plan = plan_units(model, checkpoint_names(model, saved), budget)
    got = UnitRunner(model, plan, reader, device).run(args, kwargs)
    dev = deviation(_logits(got), _logits(reference))
    check = {"input": "the example", "max_deviation": dev, "tolerance": tolerance}
    if not dev <= tolerance and rounded_original is not None and dev != float("inf"):
        noise = deviation(_logits(rounded_original()), _logits(reference))
        check.update(rounding_noise=noise, within_noise=bool(dev <= NOISE_FACTOR * noise))
        if check["within_noise"]:
            return check
    if not dev <= tolerance:
        raise MergeFailed(f"the written model differs from the original on the example by {dev:.2e} "
                          f"(tolerance {tolerance:g}" + (f"; rounding the original's weights moves it by "
                                                        f"{check['rounding_noise']:.2e}" if "rounding_noise" in check
                                                        else "") + ")")
    return check


@contextlib.contextmanager
def _written_in_place_of(out_dir: str) -> Iterator[str]:
    """A temporary sibling of ``out_dir`` to write into, renamed to ``out_dir`` when the block
    ends (an earlier ``out_dir`` replaced only then), removed if it raises."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(out_dir))}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            old = out_dir.rstrip("/") + f".replaced-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_directory(base_dir: str, adapter_dir: Optional[str], out_dir: str, example: Dict[str, Any], *,
                    max_shard_bytes: Optional[int] = None, unit_bytes: Optional[int] = None,
                    trust_remote_code: bool = False, device: str = "cpu", tolerance: Optional[float] = None,
                    cost: str = "macs", whole_model_check: bool = True, replay: bool = True,
                    extra_files: Callable[[str], bool] = lambda name: True, report_name: str = "repc_report.json",
                    report_extra: Optional[Dict[str, Any]] = None,
                    note: Callable[[str], None] = lambda text: None) -> MergeResult:
    """Merge BASE_DIR (and ADAPTER_DIR) unit by unit into OUT_DIR (see the module's docstring).

    OUT_DIR's weight files are BASE_DIR's (the same names, keys and sizes), or cut at
    ``max_shard_bytes`` where given.  Units hold at most ``unit_bytes`` of weights (by default
    ``max_shard_bytes``, else the size of BASE_DIR's largest weight file).  OUT_DIR is written as a temporary sibling and renamed at the end (an
    earlier OUT_DIR replaced only then); a failure leaves nothing.  ``extra_files(name)``: which
    of BASE_DIR's files besides ``config.json`` (always copied) go with it: tokenizer, generation
    settings...  ``replay``: units like one merged before run the ops of its merged weights
    (:func:`merge_units`); False compiles every unit."""
    import transformers

    from .verify.equivalence import resolve_tolerance

    start = time.perf_counter()
    reader = CheckpointReader(base_dir)
    config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    cls = architecture(config, trust_remote_code)
    dtype = reader.floating_dtype() or torch.float32
    model = weightless_model(config, cls, dtype, trust_remote_code)
    saved = SavedNames(model, reader)
    names = checkpoint_names(model, saved)
    load_buffers(model, reader, saved, device)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, device)
    tree = model.get_base_model() if hasattr(model, "get_base_model") else model
    layout = cut_layout(reader, max_shard_bytes) if max_shard_bytes else same_layout(reader)
    budget = unit_bytes or max_shard_bytes or reader.largest_file_bytes()
    note(f"units of at most {budget / 2 ** 20:.0f} MiB of weights")
    plan = plan_units(tree, names, budget)
    call = dict(example)
    if getattr(config, "use_cache", None) is not None:
        call.setdefault("use_cache", False)  # (the cache is not part of what is merged)

    with _written_in_place_of(out_dir) as tmp:
        writer = CheckpointWriter(tmp, layout,
                                  on_file=lambda name, size: note(f"wrote {name} ({size / 2 ** 20:.0f} MiB)"))
        try:
            reference, result = merge_units(model, plan, reader, saved, writer, (), call, device=device,
                                            tolerance=tolerance, cost=cost, replay=replay, note=note)
            result.files = writer.finish()
        finally:
            writer.close()
        result.bytes_written, result.unit_bytes = writer.total_bytes, budget
        gc.collect()  # (the last units' compiles: not held through the check)
        FreedMemory().give_back()
        if whole_model_check:
            note("checking the written model against the original on the example")
            result.check = check_written(
                weightless_model(config, cls, dtype, trust_remote_code), CheckpointReader(tmp), budget, (), call,
                reference, resolve_tolerance(tolerance, dtype), device,
                rounded_original=lambda: UnitRunner(model, plan, reader, device, perturbed=0).run((), call))
        for name in sorted(os.listdir(base_dir)):  # config, tokenizer, generation settings, model card...
            source = os.path.join(base_dir, name)
            if os.path.isfile(source) and not os.path.islink(source) and \
                    (name == "config.json" or extra_files(name)) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(source, os.path.join(tmp, name))
        result.seconds = time.perf_counter() - start
        with open(os.path.join(tmp, report_name), "w") as f:
            json.dump({**(report_extra or {}), **result.to_dict()}, f, indent=2, default=str)
    return result


def _logits(output: Any) -> Any:
    """The tensors of a model's output to compare (a ModelOutput's ``logits`` or
    ``last_hidden_state`` where it has one, else the whole output)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output
