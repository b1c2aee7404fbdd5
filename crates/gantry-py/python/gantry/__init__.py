"""gantry: stream safetensors checkpoints into GPU (or host) memory at the disk's limit.

    import gantry
    state_dict = gantry.load("model/", device="cuda:0")      # dict of torch tensors
    for name, tensor in gantry.stream("model/"):              # as each tensor lands
        ...
    for info in gantry.inspect("model/"):                    # the table, from headers alone
        print(info.name, info.dtype, info.shape)

Tensors are handed over without a copy through DLPack. With torch installed, ``load`` and
``stream`` return ``torch.Tensor``; otherwise (or with ``framework="dlpack"``) they return
:class:`gantry.Tensor`, which ``torch.from_dlpack``, ``numpy.from_dlpack``,
``cupy.from_dlpack`` and ``jax.dlpack.from_dlpack`` take as they are. Memory gantry allocated
is freed when the last tensor using it is released.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import _gantry
from ._gantry import (
    CancelledError,
    ConfigError,
    CudaError,
    FormatError,
    GantryError,
    InternalError,
    IoError,
    LiveError,
    PlacementError,
    RankError,
    Tensor,
    UnavailableError,
)

__version__: str = _gantry.__version__

__all__ = [
    "load",
    "stream",
    "inspect",
    "Stream",
    "Tensor",
    "TensorInfo",
    "GantryError",
    "FormatError",
    "IoError",
    "CudaError",
    "UnavailableError",
    "ConfigError",
    "PlacementError",
    "RankError",
    "CancelledError",
    "InternalError",
    "LiveError",
    "DtypeError",
    "serve",
    "Server",
    "update",
    "UpdateReport",
    "to_torch",
    "nccl_unique_id",
    "wait_for_cache_copies",
]

nccl_unique_id = _gantry.nccl_unique_id


def wait_for_cache_copies(timeout_s: float = 120.0) -> Tuple[List[str], int]:
    """Waits at most ``timeout_s`` seconds for the cache copies this process's loads are
    completing behind them (parts the cache's disk could not take in time, fetched again);
    returns what became of those that ended and how many are still running. Called at
    interpreter exit (logged through :mod:`logging`); a process that exits first leaves their
    temporary files for the next load's sweep, never a half-written copy."""
    return _gantry.wait_for_cache_copies(float(timeout_s))


def _wait_for_cache_copies_at_exit() -> None:
    import logging

    notes, running = wait_for_cache_copies()
    for note in notes:
        logging.getLogger("gantry").info("cache: %s", note)
    if running:
        logging.getLogger("gantry").warning("cache: %d copies still being completed at exit", running)


import atexit as _atexit  # noqa: E402

_atexit.register(_wait_for_cache_copies_at_exit)


class DtypeError(GantryError, TypeError):
    """A tensor's dtype has no equivalent in the framework asked for."""


class TensorInfo(NamedTuple):
    """One row of a checkpoint's tensor table."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: str
    offset: int
    nbytes: int


Source = Union[str, "os.PathLike[str]"]
Skip = Union[Iterable[str], Callable[[str], bool], None]

# safetensors dtype -> torch dtype attribute. float4 is packed two to a byte
# (torch.float4_e2m1fn_x2); float6 has no torch dtype.
_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}


def inspect(source: Source, **config: Any) -> List[TensorInfo]:
    """The tensor table of a checkpoint (a ``.safetensors`` file, a folder, or a
    ``model.safetensors.index.json``, an object source: ``s3://``, ``gs://``, ``az://``, or a
    live source: ``unix:///path/to/socket``), read
    from its headers alone. ``config``: for object sources, ``object_options``,
    ``s3_endpoint``, ``s3_region``, ``gcs_endpoint`` and ``azure_endpoint`` as for
    :func:`stream`."""
    return [
        TensorInfo(name, dtype, tuple(shape), file, offset, nbytes)
        for name, dtype, shape, file, offset, nbytes in _gantry.inspect(os.fspath(source), config)
    ]


def _device(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    text = str(device)  # also takes torch.device
    return "cuda:0" if text == "cuda" else text


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _itemsize(torch, dtype) -> int:
    # dtype.itemsize since torch 2.1; one scalar's size before (per tensor, so not by default).
    return getattr(dtype, "itemsize", None) or torch.empty((), dtype=dtype).element_size()


def to_torch(tensor: Tensor):
    """A ``torch.Tensor`` over the same memory as a :class:`gantry.Tensor` (no copy)."""
    torch = _torch()
    if torch is None:
        raise ImportError("gantry.to_torch needs torch")
    name = _TORCH_DTYPES.get(tensor.dtype)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise DtypeError(
            f"{tensor.name}: dtype {tensor.dtype} has no torch dtype in torch {torch.__version__}"
        )
    shape = tuple(tensor.shape)
    if tensor.dtype == "F4":
        if not shape or shape[-1] % 2:
            raise DtypeError(f"{tensor.name}: F4 tensor of shape {shape} is not whole bytes")
        shape = shape[:-1] + (shape[-1] // 2,)
    # Bytes through DLPack, then reinterpreted: every dtype, whatever torch's DLPack takes.
    raw = torch.from_dlpack(tensor.raw())
    if tensor.data_ptr() % _itemsize(torch, dtype):
        # The file puts this tensor at an offset that is not a multiple of its element size
        # (the safetensors library never does; hand-made files can): torch's kernels fault on
        # such addresses, so it gets its own aligned copy.
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def _numpy(tensor: Tensor):
    import numpy

    try:
        return numpy.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError) as e:
        raise DtypeError(f"{tensor.name}: numpy cannot take dtype {tensor.dtype}: {e}") from e


def _converter(framework: Optional[str]) -> Callable[[Tensor], Any]:
    if framework is None:
        framework = "torch" if _torch() is not None else "dlpack"
    if framework == "torch":
        if _torch() is None:
            raise ImportError("framework='torch' needs torch installed")
        return to_torch
    if framework == "numpy":
        return _numpy
    if framework == "dlpack":
        return lambda t: t
    raise ValueError(f"unknown framework {framework!r} (torch, numpy, dlpack)")


def _skip_names(source: Source, skip: Skip, config: Dict[str, Any]) -> Optional[List[str]]:
    if skip is None:
        return None
    if callable(skip):
        return [info.name for info in inspect(source, **config) if skip(info.name)]
    if isinstance(skip, str):
        return [skip]
    return list(skip)


class Stream:
    """A load in progress: iterate it for ``(name, tensor)`` as each tensor lands, while the
    rest are still loading. Made by :func:`stream`.

    The load runs on a thread of its own without the GIL. Ctrl-C while waiting stops it and
    frees its memory; so does leaving a ``with`` block early, or :meth:`cancel`. Tensors
    already handed out stay valid.
    """

    def __init__(self, inner: "_gantry.Stream", convert: Callable[[Tensor], Any]):
        self._inner = inner
        self._convert = convert

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Tuple[str, Any]:
        name, tensor = next(self._inner)
        return name, self._convert(tensor)

    def __len__(self) -> int:
        """Tensors the load delivers."""
        return len(self._inner)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self._inner.cancel()

    def cancel(self) -> None:
        """Stops the load and frees what it no longer needs."""
        self._inner.cancel()

    def report(self) -> Optional[Dict[str, Any]]:
        """Figures of the finished load (bytes, seconds, GB/s, per file the reader and why);
        ``None`` until the last tensor has been taken."""
        return self._inner.report()


def _int(name: str, value: Any) -> int:
    """``value`` as an int (``TypeError`` for anything else, ``bool`` included)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} takes an int, not {type(value).__name__}")
    return value


def _check_rank(rank: Any, world: Any) -> None:
    """``0 <= rank < world <= 1024`` (``ConfigError`` naming both otherwise)."""
    rank, world = _int("rank", rank), _int("world", world)
    if not 0 <= rank < world <= _DESTINATIONS_MAX:
        raise ConfigError(
            f"rank={rank}, world={world}: a cooperative load needs 0 <= rank < world <= "
            f"{_DESTINATIONS_MAX}"
        )


def _shard(shard: Any) -> int:
    """The destinations of a ``shard`` rule (``TypeError`` unless it is a string,
    ``ValueError`` for text that is not a rule, N from 1 to 1024), checked before any list is
    built from it."""
    if not isinstance(shard, str):
        raise TypeError(
            f"shard takes a string such as 'tp:2', 'dim0:2' or 'replicate:2', not "
            f"{type(shard).__name__}"
        )
    return _gantry.shard_destinations(shard)


# The most destinations (and ranks) of one load, as the engine bounds them.
_DESTINATIONS_MAX = 1024
# The largest ``window_mib`` (1 TiB).
_WINDOW_MIB_MAX = 1 << 20


def _coop(
    rank: Optional[int], world: Optional[int], group: Any, unique_id: Optional[str]
) -> Optional[Tuple[int, int, Optional[str], Optional[str]]]:
    """The ``coop`` argument of ``_gantry.Stream``: ``(rank, world, unique id, reason)``.

    With a ``torch.distributed`` process group, rank 0 of the group creates the NCCL unique id
    and ``broadcast_object_list`` hands it to the others (torch does not expose its own NCCL
    communicator, so gantry makes its own over the same GPUs); when rank 0 cannot load NCCL,
    every rank is told why and reads on its own."""
    if group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world > 1:
            offer: List[Any] = [None]
            if rank == 0:
                try:
                    offer = [("id", _gantry.nccl_unique_id())]
                except UnavailableError as e:
                    offer = [("alone", f"rank 0: {e}")]
            dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
            kind, value = offer[0]
            return (rank, world, value, None) if kind == "id" else (rank, world, None, value)
        return (rank, world, None, "world size 1: nothing to share")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        raise ConfigError("a cooperative load needs both rank= and world= (or group=)")
    _check_rank(rank, world)
    if unique_id is not None and not isinstance(unique_id, str):
        raise TypeError(f"unique_id is a hex string, not {type(unique_id).__name__}")
    if world == 1:
        return (rank, world, None, "world size 1: nothing to share")
    if unique_id is None:
        return (rank, world, None, "no unique_id= given: each rank reads on its own")
    return (rank, world, unique_id, None)


def stream(
    source: Source,
    device: Any = "cuda:0",
    *,
    skip: Skip = None,
    framework: Optional[str] = None,
    rank: Optional[int] = None,
    world: Optional[int] = None,
    group: Any = None,
    unique_id: Optional[str] = None,
    **config: Any,
) -> Stream:
    """Starts loading ``source`` onto ``device`` and returns an iterator of ``(name, tensor)``
    that yields each tensor as soon as its bytes have landed.

    ``device``: ``"cuda:N"``, ``"cuda"``, an int, a ``torch.device``, or ``"cpu"``.
    ``skip``: names of tensors not to load, or a predicate on the name.
    ``framework``: ``"torch"`` (the default when torch is installed), ``"numpy"`` (host
    loads), or ``"dlpack"`` for :class:`gantry.Tensor`.
    ``config``: ``path`` (``"auto"``, ``"direct"``, ``"buffered"``, ``"gds"``), ``profile``
    (``"auto"``, ``"gp3"``, ``"io2"``, ``"nvme"``), ``queue_depth``, ``chunk_bytes``,
    ``buffered_chunk_bytes``, ``staging_bytes``, ``threads``, ``hot_fraction``,
    ``verify_sha256`` (hash every file read and check it against the digest known for it; a
    mismatch raises :class:`IoError` naming the file and both digests; ``report()["sha256"]``
    says per file whether it was checked and against what), ``require_sha256`` (the same,
    and a file with no known digest raises :class:`IoError` naming it), ``trace`` (a file to
    write the load's timeline to, as Chrome trace-event JSON for Perfetto), ``share_live``
    (a load to a GPU from a live source served on a GPU of this host returns tensors that
    alias the server's memory, read-only by contract, instead of copies), as the Rust
    ``Config`` names them; for object sources (``s3://``, ``gs://``, ``az://``, ``abfs://``,
    ``https://ACCOUNT.blob.core.windows.net/...``) ``cache_dir`` (a local copy of every object
    read, reused while its ETag is unchanged, private to the caller), ``cache_shared`` (the
    cache is shared with its directory's group: see the README's trust model),
    ``object_part_bytes``, ``object_concurrency``,
    ``object_options`` (a dict of ``object_store`` keys: ``aws_*``, ``google_*``, ``azure_*``,
    or ``allow_http``, ``timeout``; ``s3_options`` is its older name), ``s3_endpoint``,
    ``s3_region``, ``gcs_endpoint`` and ``azure_endpoint``, over each provider's environment
    variables (``AWS_*``; ``GOOGLE_APPLICATION_CREDENTIALS``, ``GOOGLE_SERVICE_ACCOUNT``,
    ``STORAGE_EMULATOR_HOST``; ``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``,
    ...).

    One process per GPU (tensor parallelism): pass ``group=`` (a ``torch.distributed``
    process group, e.g. the tensor-parallel group) or ``rank=``, ``world=`` and
    ``unique_id=`` (from :func:`gantry.nccl_unique_id` on rank 0, handed to the others)
    and every rank of the group makes the same call: the ranks split the reads (each byte read
    from storage once across them) and exchange over NVLink with NCCL, and each rank gets
    every tensor. Without NCCL each rank reads on its own; ``report()["cooperative_reason"]``
    says why.
    """
    convert = _converter(framework)
    coop = _coop(rank, world, group, unique_id)
    inner = _gantry.Stream(
        os.fspath(source), _device(device), config, _skip_names(source, skip, config), coop
    )
    return Stream(inner, convert)


def load(
    source: Source,
    device: Any = "cuda:0",
    *,
    skip: Skip = None,
    framework: Optional[str] = None,
    shard: Optional[str] = None,
    devices: Optional[Sequence[Any]] = None,
    tp_rules: Optional[Sequence[Tuple[str, str]]] = None,
    rank: Optional[int] = None,
    world: Optional[int] = None,
    group: Any = None,
    unique_id: Optional[str] = None,
    **config: Any,
) -> Any:
    """Loads ``source`` (a ``.safetensors`` file, a folder, or an index) onto ``device`` and
    returns ``{name: tensor}``. Options as for :func:`stream`.

    With ``shard``, the checkpoint is read once and placed across several destinations, and
    the result is a list with one ``{name: tensor}`` per destination:

    - ``shard="tp:N"``: the tensor-parallel rule of vLLM and Megatron by tensor name
      (column-parallel weights split along dimension 0, row-parallel along dimension 1, norms
      and routers whole; a split that does not divide is a ``PlacementError`` (a ``ConfigError``) naming the
      tensor). ``tp_rules=[("*.my_proj.weight", "row"), ...]`` go ahead of the built-in
      patterns (``column``, ``row``, ``replicate`` or ``dimK``).
    - ``shard="dimK:N"``: tensors split evenly along dimension K where it divides, the rest
      whole; ``shard="replicate:N"``: every tensor whole to each.

    ``devices`` names the N destinations (``["cuda:0", "cuda:1"]``, the same GPU may appear
    more than once); without it, ``N`` times ``"cpu"`` when ``device`` is ``"cpu"``, else
    ``cuda:0`` to ``cuda:N-1``.

    The cooperative options (``group=``, or ``rank=``, ``world=`` and ``unique_id=``) are as
    for :func:`stream`. With ``shard`` as well (``shard="tp:N"`` over the N ranks), each rank
    gets only its shares, as one ``{name: tensor}`` on ``device``: the ranks still read each
    byte once and exchange the checkpoint a window at a time (``window_mib``, default 2048, of
    scratch on each GPU beside its shares).
    """
    coop = dict(rank=rank, world=world, group=group, unique_id=unique_id)
    if shard is None:
        if devices is not None or tp_rules is not None:
            raise ValueError("devices and tp_rules go with shard")
        with stream(source, device, skip=skip, framework=framework, **coop, **config) as s:
            return dict(s)
    if skip is not None:
        raise ValueError("skip does not go with shard (the rule says what each destination takes)")
    convert = _converter(framework)
    if any(v is not None for v in coop.values()):
        if devices is not None:
            raise ValueError("devices does not go with a cooperative load (each rank has one)")
        _shard(shard)
        rank_, world_, unique, alone = _coop(rank, world, group, unique_id) or (0, 1, None, None)
        window = config.pop("window_mib", None)
        if window is not None:
            _int("window_mib", window)
            if not 1 <= window <= _WINDOW_MIB_MAX:
                raise ConfigError(f"window_mib={window}: must be from 1 to {_WINDOW_MIB_MAX}")
        shares, _cooperative, _reason = _gantry.load_cooperative_placed(
            os.fspath(source),
            _device(device),
            shard,
            rank_,
            world_,
            unique,
            alone,
            config,
            [tuple(r) for r in tp_rules or []],
            window,
        )
        return {name: convert(t) for name, t in shares}
    count = _shard(shard)
    if devices is None:
        if _device(device) == "cpu":
            devices = ["cpu"] * count
        else:
            devices = [f"cuda:{i}" for i in range(count)]
    names = [_device(d) for d in devices]
    placed = _gantry.load_placed(
        os.fspath(source), names, shard, config, [tuple(r) for r in tp_rules or []]
    )
    return [{name: convert(t) for name, t in shares} for shares in placed]


# torch dtype name -> safetensors dtype.
_FROM_TORCH = {v: k for k, v in _TORCH_DTYPES.items()}
# numpy dtype name -> safetensors dtype.
_FROM_NUMPY = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
    "float32": "F32", "float64": "F64", "complex64": "C64",
}


def _describe(name: str, tensor: Any, torch: Any) -> Tuple[str, Tuple[int, ...], str]:
    """``(safetensors dtype, shape, device)`` of a torch tensor or numpy array."""
    if torch is not None and isinstance(tensor, torch.Tensor):
        dtype = _FROM_TORCH.get(str(tensor.dtype).replace("torch.", ""))
        shape = tuple(tensor.shape)
        if dtype == "F4":  # torch packs two float4 in a byte
            shape = shape[:-1] + (shape[-1] * 2,) if shape else shape
        device = str(tensor.device)
    elif hasattr(tensor, "dtype") and hasattr(tensor, "shape") and hasattr(tensor, "reshape"):
        dtype = _FROM_NUMPY.get(str(tensor.dtype))
        shape = tuple(int(d) for d in tensor.shape)
        device = "cpu"
    else:
        raise TypeError(f"{name}: a torch.Tensor or numpy array, not {type(tensor).__name__}")
    if dtype is None:
        raise DtypeError(f"{name}: dtype {tensor.dtype} has no safetensors dtype")
    return dtype, shape, "cuda:0" if device == "cuda" else device


def _host_bytes(name: str, tensor: Any, torch: Any, writable: bool) -> Any:
    """A flat uint8 view of a host tensor's own memory (for ``writable`` targets, the tensor's
    memory itself or an error: a copy would take the update and be thrown away)."""
    if torch is not None and isinstance(tensor, torch.Tensor):
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            if writable:
                raise ValueError(f"{name}: not contiguous; an update writes in place")
            tensor = tensor.contiguous()
        return tensor.reshape(-1).view(torch.uint8)
    import numpy

    if writable and not (tensor.flags.c_contiguous and tensor.flags.writeable):
        raise ValueError(f"{name}: not a writable C-contiguous array; an update writes in place")
    flat = numpy.ascontiguousarray(tensor).reshape(-1).view(numpy.uint8)
    # numpy does not export read-only arrays through DLPack: publish a copy of those.
    return flat if flat.flags.writeable else flat.copy()


class Server:
    """A live source being served on a Unix socket; made by :func:`serve`. Readers load it as
    ``gantry.load(server.url)`` (any process of this user, or of those ``socket_mode``
    lets connect)."""

    def __init__(self, inner: "_gantry.Server", config: Dict[str, Any]):
        self._inner = inner
        self._config = config

    @property
    def url(self) -> str:
        """``unix:///path``, the source string readers use."""
        return self._inner.url

    @property
    def version(self) -> Optional[str]:
        """The current version's id."""
        return self._inner.version

    def update(self, state_dict_or_path: Any) -> str:
        """Publishes a new version (a state dict, or any source gantry reads) and returns its
        id. New readers get it; a reader holding an older version keeps it, whole, until it
        lets go."""
        if isinstance(state_dict_or_path, (str, os.PathLike)):
            return self._inner.publish(os.fspath(state_dict_or_path), self._config)
        torch = _torch()
        tensors = []
        for name, tensor in state_dict_or_path.items():
            dtype, shape, device = _describe(name, tensor, torch)
            if device != "cpu":
                tensor = tensor.detach().to("cpu")
            tensors.append((name, dtype, list(shape), _host_bytes(name, tensor, torch, False)))
        return self._inner.publish_tensors(tensors)

    def close(self) -> None:
        """Stops serving and removes the socket file; readers holding a lease keep their
        bytes."""
        self._inner.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(
    state_dict_or_path: Any,
    socket: Source,
    device: Any = "cpu",
    socket_mode: int = 0o600,
    max_connections_per_user: Optional[int] = None,
    **config: Any,
) -> Server:
    """Publishes a state dict (``{name: torch.Tensor or numpy array}``) or a checkpoint (any
    source gantry reads) on the Unix socket ``socket``, and returns the :class:`Server`:
    ``server.update(new_state_dict_or_path)`` publishes a new version, ``server.close()`` (or
    leaving ``with``) stops serving. Readers load ``server.url`` (``unix:///path``).

    A state dict becomes one ``model.safetensors`` in a sealed memfd: contiguous CPU tensors
    are read where they lie (one copy, into the shared memory); non-contiguous ones are made
    contiguous first; CUDA tensors are copied to the host first (the shared memory is the
    publication's reference copy, and its digests are computed there). ``device``: ``"cpu"``
    keeps the weights in host memory only; ``"cuda:N"`` (or ``N``) keeps a copy on that GPU
    too, which readers on this host copy from (or alias, with ``share_live=True``) over CUDA
    IPC. ``socket_mode``: the socket file's mode (0o600: this user alone).
    ``max_connections_per_user``: most connections (leases) one user may hold at once, 1 to
    1024 (``None``: 256), so that one user the mode lets in cannot take every connection; more
    are refused, and the reader's :class:`LiveError` says so. ``config``: as for
    :func:`stream`, for loading a checkpoint source.
    """
    where = _device(device)
    if where == "cpu":
        ordinal = None
    elif where.startswith("cuda:") and where[5:].isdigit():
        ordinal = int(where[5:])
    else:
        raise ConfigError(f"device {device!r}: 'cpu' or 'cuda:N'")
    per_user = None
    if max_connections_per_user is not None:
        per_user = _int("max_connections_per_user", max_connections_per_user)
        if per_user < 1:  # the upper bound is the engine's to check
            raise ConfigError(f"max_connections_per_user {per_user}: at least 1")
    inner = _gantry.Server(os.fspath(socket), _int("socket_mode", socket_mode), ordinal, per_user)
    server = Server(inner, config)
    try:
        server.update(state_dict_or_path)
    except BaseException:
        server.close()
        raise
    return server


class UpdateReport(NamedTuple):
    """What :func:`update` did."""

    moved_tensors: int
    moved_bytes: int
    skipped_tensors: int
    skipped_bytes: int
    ignored_tensors: int
    version: Optional[str]


def update(
    dest_state_dict: Dict[str, Any],
    source: Source,
    changed_only: bool = False,
    *,
    ignore_extra: bool = False,
    **config: Any,
) -> UpdateReport:
    """Copies ``source`` (a live source ``unix:///path``, or any checkpoint) into the tensors
    of ``dest_state_dict`` in place, by name: a serving engine refits without reallocating.

    Every tensor must match the source's by name, dtype and shape; each tensor of the source
    needs a destination unless ``ignore_extra``; a mismatch raises :class:`ConfigError` naming
    the tensor before any byte moves. Destinations are all CPU tensors (torch or numpy,
    contiguous and writable, not sharing memory) or all on one GPU.

    ``changed_only``: only tensors whose digest differs from the destination's move (needs a
    live source, whose published table gives the digests). On the host the destination's
    digest is hashed from its bytes; on a GPU it is the digest gantry recorded when an update
    last wrote that address, so if anything else writes into the weights (an optimizer step,
    a load, memory freed and reused), pass ``changed_only=False``.
    """
    torch = _torch()
    described = {n: _describe(n, t, torch) for n, t in dest_state_dict.items()}
    devices = {d for _, _, d in described.values()}
    if len(devices) > 1:
        raise ValueError(f"update destinations on several devices: {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    source = os.fspath(source)
    if device == "cpu":
        targets = [
            (n, described[n][0], list(described[n][1]), _host_bytes(n, t, torch, True))
            for n, t in dest_state_dict.items()
        ]
        report = _gantry.update_host(source, targets, changed_only, ignore_extra, config)
    elif device.startswith("cuda:"):
        for n, t in dest_state_dict.items():
            if not t.is_contiguous():
                raise ValueError(f"{n}: not contiguous; an update writes in place")
        ordinal = int(device.split(":", 1)[1])
        # The weights' pending work on torch's streams ends before gantry writes them.
        torch.cuda.synchronize(ordinal)
        targets = [
            (n, described[n][0], list(described[n][1]), t.data_ptr())
            for n, t in dest_state_dict.items()
        ]
        report = _gantry.update_device(source, ordinal, targets, changed_only, ignore_extra, config)
    else:
        raise ValueError(f"update destinations on {device}: cpu or cuda:N")
    return UpdateReport(**report)
