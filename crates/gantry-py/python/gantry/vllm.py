"""vLLM load format ``gantry``: ``vllm serve MODEL --load-format gantry``.

Installed with the package, vLLM finds :func:`register` through the ``vllm.general_plugins``
entry point in every process it starts, and the ``gantry`` load format then feeds the model's
``load_weights`` from :func:`gantry.stream`: tensors go straight from the files into this
rank's GPU and are handed to the model as they land.

With tensor parallelism each rank gets every tensor in its own GPU and its parameters' weight
loaders keep the slices that rank owns; the loaded checkpoint is freed file by file as its
tensors are consumed. The ranks of the tensor-parallel group load cooperatively: each byte is
read from storage by one rank and exchanged over NVLink with NCCL (``{"cooperative": false}``
makes every rank read the whole checkpoint itself, as without NCCL). Where the whole checkpoint does not fit beside the model on one
GPU, stream through host memory instead:
``--model-loader-extra-config '{"device": "cpu"}'``. A model in object storage
(``s3://``, ``gs://``, ``az://``, ``abfs://``, ``https://ACCOUNT.blob.core.windows.net/``)
is streamed from the store, each provider configured from its environment or from
``object_options`` in that JSON. A live source (``unix:///path/to/socket``: a ``gantry serve``
or a framework's :func:`gantry.serve`) is loaded from the running process, given as the model
path or as ``{"source": "unix:///..."}`` in that JSON (``source`` takes any source gantry reads
in place of the model path; vLLM still reads the model's config from the model path). Any
other key of that JSON is passed to
:func:`gantry.stream` as a config keyword (``path``, ``queue_depth``, ``chunk_bytes``, ...).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict

import gantry

LOAD_FORMAT = "gantry"


# Object sources gantry streams from directly (see gantry.inspect).
_OBJECT_URL = re.compile(
    r"^((s3|gs|az|abfs|abfss|azure)://|https://[^/]+\.(blob|dfs)\.core\.windows\.net/)"
)


def _model_folder(model_config: Any, source: Any = None) -> str:
    """Where the model's safetensors files are: ``source`` when given (the extra config's
    ``"source"``), a live source (``unix:///path``) given as the model path, an object source (``s3://``, ``gs://``,
    ``az://``, ...) as vLLM was given it (``model_weights`` where vLLM keeps the remote
    location of a model whose config it fetched, else ``model``), streamed from the store; else
    the local folder (downloaded from the Hub if vLLM was given a repository id)."""
    if source is not None:
        return os.fspath(source)
    if isinstance(model_config.model, str) and model_config.model.startswith("unix://"):
        return model_config.model
    for remote in (getattr(model_config, "model_weights", None), model_config.model):
        if isinstance(remote, str) and _OBJECT_URL.match(remote):
            return remote if remote.endswith((".json", ".safetensors")) else remote.rstrip("/") + "/"
    model = model_config.model
    if os.path.isdir(model):
        folder = model
    else:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            model,
            revision=getattr(model_config, "revision", None),
            allow_patterns=["*.safetensors", "*.json"],
        )
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        raise gantry.FormatError(f"{folder}: no .safetensors files for load format 'gantry'")
    return folder


def _tensor_parallel_group() -> Any:
    """vLLM's tensor-parallel group as a CPU (gloo) process group, when it has more than one
    rank; ``None`` otherwise. Its ranks are the processes that load the same checkpoint onto
    different GPUs."""
    try:
        from vllm.distributed.parallel_state import get_tp_group
    except ImportError:
        return None
    try:
        tp = get_tp_group()
    except AssertionError:  # no model parallelism initialised (a plain single-GPU run)
        return None
    return tp.cpu_group if tp.world_size > 1 else None


def make_loader_class(base: type) -> type:
    """The gantry loader as a subclass of vLLM's ``BaseModelLoader`` (passed in, so that this
    module imports without vLLM)."""

    class GantryModelLoader(base):  # type: ignore[misc, valid-type]
        """Loads weights with gantry."""

        def __init__(self, load_config: Any):
            super().__init__(load_config)
            options: Dict[str, Any] = dict(getattr(load_config, "model_loader_extra_config", None) or {})
            self.device = options.pop("device", None)
            self.cooperative = bool(options.pop("cooperative", True))
            self.source = options.pop("source", None)
            self.options = options

        def download_model(self, model_config: Any) -> None:
            _model_folder(model_config, self.source)

        def load_weights(self, model: Any, model_config: Any) -> None:
            import torch

            folder = _model_folder(model_config, self.source)
            device = self.device or f"cuda:{torch.cuda.current_device()}"
            options = dict(self.options)
            group = _tensor_parallel_group() if self.cooperative and device != "cpu" else None
            if group is not None:
                options["group"] = group
            weights = gantry.stream(folder, device=device, framework="torch", **options)
            loaded = model.load_weights(weights)
            report = weights.report()
            if report is not None:
                import logging

                logging.getLogger("gantry").info(
                    "gantry loaded %.2f GB in %.2f s (%.2f GB/s)",
                    report["tensor_bytes"] / 1e9,
                    report["seconds"],
                    report["gb_per_s"],
                )
            if loaded is not None:
                missing = {n for n, _ in model.named_parameters()} - set(loaded)
                if missing:
                    raise gantry.GantryError(
                        f"{folder}: weights not loaded for {sorted(missing)[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}"
                    )

    return GantryModelLoader


def register() -> None:
    """vLLM plugin entry point: registers the ``gantry`` load format."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    register_model_loader(LOAD_FORMAT)(make_loader_class(BaseModelLoader))
