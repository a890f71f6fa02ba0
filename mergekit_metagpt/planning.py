"""Plan a recipe with mergekit's own planner, without merging (for the CLI).

The same steps as a ``mergekit-yaml`` run up to the executor: the plugin's recipe
checks, mergekit's architecture lookup, loader set-up and ``MergePlanner``, which
resolves and validates every parameter. The MetaGPT tasks of the plan make the
``MergeRun`` whose norms ``coefficients``, ``bake`` and ``inspect`` report.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import weakref
from typing import Optional

from mergekit_metagpt.env import switched_on
from mergekit_metagpt.fork_safety import renew_after_fork
from mergekit_metagpt.errors import MetaGPTError, one_line

LOG = logging.getLogger("mergekit_metagpt")


def models_in_order(config) -> list:
    """The recipe's models, base first, then in the order the recipe names them
    (mergekit's ``referenced_models()`` is a set: its order changes between runs)."""
    ordered = []

    def add(model) -> None:
        if model is not None and model not in ordered:
            ordered.append(model)

    add(config.base_model)
    for part in [config, *(config.modules or {}).values()]:  # the recipe, then its modules
        for entry in part.models or []:
            add(entry.model)
        for piece in part.slices or []:
            add(piece.base_model)
            for source in piece.sources:
                add(source.model)
    for model in config.referenced_models():
        add(model)
    return ordered


def _check_lora_merge_dtype(options) -> None:
    """A ``--lora-merge-dtype`` mergekit does not know: mergekit makes the adapter's merge
    folder before it reads the dtype, and a later run takes that empty folder for the
    merged model."""
    from mergekit_metagpt.recipe_checks import floating_dtype

    value = getattr(options, "lora_merge_dtype", None)
    if value and not floating_dtype(value):  # int64: no model is instantiated in it
        raise MetaGPTError(f"--lora-merge-dtype {value!r} is not a floating-point dtype mergekit knows "
                           f"(bfloat16, float16, float32, float64)")


def _check_models_load(config, options) -> None:
    """Each referenced model's config loads, or one line naming that model."""
    def looks_local(path: str) -> bool:
        return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path

    for model in models_in_order(config):
        path = model.model.path
        for part, what in ((path, "no such folder"),
                           (model.lora.path if model.lora else "", "no such LoRA adapter folder")):
            if part.startswith("~") and not os.path.exists(part):  # a YAML recipe is no shell
                raise MetaGPTError(
                    f"model {model}: mergekit does not expand ~ (it would read a folder named "
                    f"{part.split('/')[0]!r} in {os.getcwd()}, or ask the hub): write the path in full"
                    + (f", {os.path.expanduser(part)}" if part != os.path.expanduser(part) else ""))
            if part and looks_local(part) and not os.path.exists(part):  # as mergekit reads it: no ~
                where = "" if os.path.isabs(part) else (
                    f" (a relative path, read from the folder the command runs in: {os.getcwd()})")
                raise MetaGPTError(f"model {model}: {what}{where}")
        _refuse_a_folder_that_is_no_model(model, path)
        if model.lora and not options.lora_merge_cache:
            raise MetaGPTError(
                f"model {model}: a LoRA adapter is merged by mergekit into --lora-merge-cache DIR; "
                "pass that option"
            )
        if model.lora:
            _check_lora_merge_dtype(options)
        _warn_of_a_local_typo(model, path)
        try:
            model.config(trust_remote_code=options.trust_remote_code)
        except Exception as error:  # hub errors, bad configs: name the model
            hints = []
            if not os.path.exists(path):
                # `models/foo` is a hub id to mergekit: a local folder misspelt ends here
                hints.append(f"read as a hub id: there is no folder {path} in {os.getcwd()}")
                if not switched_on("HF_HUB_OFFLINE"):
                    hints.append("set HF_HUB_OFFLINE=1 to fail at once without network")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise MetaGPTError(f"cannot load model {model}: {one_line(error)}{hint}") from None


#: Names (last parts) of the tensors quantized checkpoints hold beside, or for, their
#: weights: bitsandbytes (SCB, absmax, quant_map, quant_state…), GPTQ / AWQ (qweight, qzeros,
#: scales, g_idx), FP8 and compressed-tensors (weight_scale, weight_scale_inv, input_scale,
#: weight_packed, weight_zero_point).
QUANTIZATION_TENSORS = {"SCB", "weight_format", "absmax", "quant_map", "qweight", "qzeros", "scales", "g_idx",
                        "weight_scale", "weight_scale_inv", "input_scale", "weight_packed", "weight_zero_point"}


def _refuse_quantized(model, loader, model_config) -> None:
    """A quantized checkpoint (its config's `quantization_config`, and tensors of
    quantization beside its weights) stores codes and scales, not its weights: their
    differences are no task vector, and one such model took nearly all of λ. mergekit reads
    them as plain tensors, with no message. A `quantization_config` over plain weights (a
    model dequantized that kept the key) is merged, with a warning."""
    quantization = getattr(model_config, "quantization_config", None)
    if not quantization:
        return
    method = (quantization.get("quant_method") if isinstance(quantization, dict)
              else getattr(quantization, "quant_method", None))
    method = getattr(method, "value", method)
    said = f"quant_method {method}" if method else "quantization_config"
    names = list(getattr(getattr(loader, "index", None), "tensor_paths", None) or ())
    marks = [n for n in names if n.rsplit(".", 1)[-1] in QUANTIZATION_TENSORS or ".quant_state." in n]
    if marks:
        raise MetaGPTError(
            f"model {model} is quantized ({said} in its config.json; it holds {marks[0]!r}"
            + (f" and {len(marks) - 1} more such tensors" if len(marks) > 1 else "") + "): it stores codes and "
            "scales, not its weights, so its differences from the base are no task vector; merge its "
            "unquantized checkpoint (or dequantize it first)"
        )
    LOG.warning("MetaGPT: model %s's config.json has a quantization_config (%s), but it holds no tensor of "
                "quantization (scales, codes): merged as its tensors are (if it was dequantized, the key can "
                "go)", model, said)


def _refuse_a_folder_that_is_no_model(model, local: str) -> None:
    """A local path that is a file, or a folder without a config.json (a LoRA adapter's,
    a tokenizer's): said as such (mergekit's words: "is not a valid JSON file", "Should
    have a model_type key in its config.json")."""
    if os.path.isfile(local):
        raise MetaGPTError(f"model {model} is a file; give the folder that holds it and its config.json")
    if not os.path.isdir(local) or os.path.exists(os.path.join(local, "config.json")):
        return
    if os.path.exists(os.path.join(local, "adapter_config.json")):
        raise MetaGPTError(
            f"model {model} is a LoRA adapter (adapter_config.json), not a model; write it after the model it "
            f"adapts, `model: MODEL+{local}` (with --lora-merge-cache DIR)"
        )
    raise MetaGPTError(f"model {model} has no config.json (a model's folder holds one beside its weights)")


def _warn_of_a_local_typo(model, path: str) -> None:
    """`models/mathz` (no such folder, though `models/` is one here) is a hub id to mergekit,
    which asks the hub about it: without network that takes tens of seconds of retries
    before the refusal. Said before the wait, where it is most likely a misspelt local folder."""
    first = path.split("/", 1)[0]
    if ("/" not in path or os.path.exists(path) or not first
            or not os.path.isdir(first) or switched_on("HF_HUB_OFFLINE")):
        return
    LOG.warning("MetaGPT: model %s: there is no folder %s in %s, though %s/ is a folder there; "
                "mergekit reads it as a hub id and asks the hub about it (tens of seconds without "
                "network). If you meant a local folder, check its name", model, path, os.getcwd(), first)


def open_loaders(config, options) -> dict:
    """mergekit's loader of each model of the recipe, opened as mergekit's ``run_merge``
    opens them before planning (a LoRA is merged into ``--lora-merge-cache``, a single
    ``.bin`` file unpickled to list its tensors), and reading the files as they are now
    (``_current_loader``); a failure is one line naming the model (mergekit's names none,
    and a damaged pickle ends ``mergekit-yaml`` with a bare "Aborted!").

    Returns model -> (its loader's index, the fingerprint of its files), taken with no
    shard open, before mergekit reads any: what the merge reads from then on is these
    files, unless the check at its end (``MergeRun.changed_inputs``) finds them changed."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.setup(options=options)
    keys = {}
    for model in models_in_order(config):
        try:
            key = _current_loader(cache, model)
        except Exception as error:
            raise MetaGPTError(
                f"cannot load model {model}: {one_line(error)}{_cached_snapshot_hint(model, options)}"
            ) from None
        try:
            loader, model_config = cache.get(model), model.config(trust_remote_code=options.trust_remote_code)
        except Exception:  # said by the checks before, in their words
            continue
        if key is not None:
            keys[model] = (loader.index, key)
        _refuse_quantized(model, loader, model_config)
    return keys


#: Each loader's files and settings (``_loader_key``) when the plugin opened or replaced it.
_OPENED_AT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# after a fork, mergekit's loaders are the parent's, each with a lock another thread of the
# parent may have held (reading a tensor) then: forgotten, the child's next MetaGPT merge
# replaces them (`_current_loader`) rather than wait on such a lock for ever
renew_after_fork(__name__, "_OPENED_AT", factory=weakref.WeakKeyDictionary)

#: The settings of mergekit's loader cache a loader is made with.
_SETTINGS = ("lora_cache_dir", "hf_cache_dir", "lazy_unpickle", "trust_remote_code", "lora_merge_dtype")


def _current_loader(cache, model) -> Optional[str]:
    """Make mergekit's loader of `model` one that reads its files as they are now, with
    this merge's settings, and return the fingerprint of those files (``checkpoint_key``;
    None where it cannot be taken). mergekit 0.1.5 keeps one loader per model for the whole
    process (``LoaderCache``), holding the index of its files and its last shard open: a
    checkpoint rewritten since an earlier merge would be read partly as it was (every
    method; a MetaGPT merge would also cache those norms under the new files' key), a
    changed sharding fails on files that are gone, and a later merge's options (another
    ``--lora-merge-cache``, ``--lazy-unpickle`` …) would not apply. A loader the plugin
    did not open, or whose files or settings changed since it did, is replaced by a new
    one, in one assignment (a merge running meanwhile in another thread always finds a
    loader, the old or the new); an unchanged one is kept (for a hub model, mergekit
    asks the hub again for every new loader), its open shard closed first: a file replaced
    by rename since it was opened would still be read through it, whatever the key says."""
    loaders = getattr(cache, "loaders", None)
    existing = loaders.get(model) if isinstance(loaders, dict) else None
    if existing is None:
        loader = cache.get(model)
    else:
        flush = getattr(existing, "flush", None)
        if callable(flush):
            flush()
        try:
            key = _loader_key(cache, existing)
            if _OPENED_AT.get(existing) == key:
                return key[0]
        except Exception:  # a file its index names is gone: replaced
            pass
        loader = _new_loader(cache, model)
        if loader is None:  # a mergekit of another shape: its loader as it is
            return _files_key(existing)
        loaders[model] = loader
    try:
        key = _loader_key(cache, loader)
    except Exception:  # not keyed: replaced at the next merge
        return _files_key(loader)
    _OPENED_AT[loader] = key
    return key[0]


def _files_key(loader) -> Optional[str]:
    from mergekit_metagpt.fingerprint import checkpoint_key

    try:
        return checkpoint_key(loader.index)
    except Exception:
        return None


def _loader_key(cache, loader) -> tuple:
    """The loader's files as they are (``fingerprint``: its shards and its map of names),
    the names in their folder and the key of each index file there (a model sharded since,
    written as one file, or whose index alone was rewritten), and the cache's settings."""
    from mergekit_metagpt.fingerprint import checkpoint_key, file_key

    folder = loader.index.base_path
    names = tuple(sorted(os.listdir(folder)))
    indexes = tuple(file_key(os.path.join(folder, name)) for name in names if name.endswith(".index.json"))
    return (checkpoint_key(loader.index), names, indexes,
            tuple(repr(getattr(cache, name, None)) for name in _SETTINGS))


def _new_loader(cache, model):
    """A new loader of `model` made as mergekit's ``LoaderCache.get`` makes one, with the
    cache's settings, or None where mergekit's loader cache has another shape."""
    if not all(hasattr(cache, name) for name in _SETTINGS) or not hasattr(model, "merged"):
        return None
    merged = model.merged(cache_dir=cache.lora_cache_dir, trust_remote_code=cache.trust_remote_code,
                          lora_merge_dtype=cache.lora_merge_dtype)
    return merged.lazy_loader(cache_dir=cache.hf_cache_dir, lazy_unpickle=cache.lazy_unpickle)


def _cached_snapshot_hint(model, options) -> str:
    """Where a hub model that did not load is in the hub cache: mergekit 0.1.5 asks the
    hub for its list of files (``list_repo_files``) even when it is cached, so with no
    network only the snapshot's folder loads."""
    path, lora = model.model.path, getattr(model, "lora", None)
    if lora is not None or os.path.exists(path):
        return ""
    try:
        import huggingface_hub

        folder = huggingface_hub.snapshot_download(
            path, revision=model.model.revision, cache_dir=getattr(options, "transformers_cache", None),
            local_files_only=True,
        )
    except Exception:  # not in the cache
        return ""
    return (f" (mergekit asks the hub for a hub model's files even when it is cached; without "
            f"the hub, give the cached snapshot's folder instead: {folder})")


def refuse_output_into_an_input(config, out_path) -> None:
    """An output folder that is one of the inputs' own (mergekit would overwrite its
    config.json and card and write its shards beside the model's, under an index that
    still names the model's: neither model is left)."""
    if not isinstance(out_path, (str, os.PathLike)) or not os.path.isdir(out_path):
        return
    from mergekit_metagpt.merge_plan import place, same_folder

    for model in models_in_order(config):
        for path in (model.model, model.lora):
            # a local folder, resolved (a hub id is no path here); one folder, however spelt
            if path is not None and same_folder(place(path)[0], out_path):
                raise MetaGPTError(
                    f"the output folder {out_path} is model {model}'s own folder: the merge would overwrite its "
                    f"files; give another output folder"
                )


#: The weight files mergekit-pytorch writes (its shards and their index).
_RAW_OUTPUT_NAME = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def check_raw_files(module, config, out_path, options, tensor_intersection: bool = False) -> None:
    """mergekit-pytorch's inputs (files: a ``.safetensors``, or a pickle ``.bin``/``.pt``),
    each opened by its own loader cache (``SimpleLoaderCache``, which the merge then reuses),
    before anything is planned or read: a damaged or missing file is one line naming the
    model (mergekit's traceback names no file); a pickle holding its tensors under
    ``state_dict`` is refused (mergekit 0.1.5 lists the tensors inside it, but its loader
    looks them up at the file's top level: a ``KeyError`` mid-merge), as is one holding a
    0-dimensional tensor the merge reads under ``--lazy-unpickle`` (which cannot read one:
    a ``TypeError`` mid-merge; the names mergekit plans are those of the ``models:``, all
    inputs' common ones with ``--tensor-intersection``); and an input file in the output
    folder under a name the merge writes (``model*.safetensors``, ``pytorch_model*.bin``,
    their index), which it would write over."""
    cache_type = getattr(module, "SimpleLoaderCache", None)
    paths = [p for p in dict.fromkeys([*(m.model for m in config.models), config.base_model]) if p]
    if isinstance(out_path, (str, os.PathLike)) and os.path.isdir(out_path):
        from mergekit_metagpt.merge_plan import same_folder

        for path in paths:
            if _RAW_OUTPUT_NAME.match(os.path.basename(path)) and \
                    same_folder(os.path.dirname(os.path.abspath(path)) or ".", out_path):
                raise MetaGPTError(f"the output folder {out_path} holds model {path}, under a name mergekit-pytorch "
                                   f"writes its merged weights to: the merge would overwrite it; give another "
                                   f"output folder")
    if cache_type is None:  # mergekit changed shape: its own errors then
        return
    cache = cache_type()
    if hasattr(options, "lazy_unpickle"):
        cache.lazy_unpickle = options.lazy_unpickle  # as plan_flat_merge sets it, next
    names = {}
    for path in paths:
        try:
            names[path] = set(cache.get(path).index.tensor_paths)
        except Exception as error:
            raise MetaGPTError(f"cannot load model {path}: {one_line(error)}") from None
    planned = set().union(*(names[m.model] for m in config.models))
    if tensor_intersection:
        planned = planned.intersection(*names.values())
    import torch

    for path in paths:
        if getattr(cache.get(path).index, "is_safetensors", True):
            continue
        try:
            top = torch.load(path, map_location="meta")  # as mergekit's index reads it: no data
        except Exception:  # read by mergekit's index above: not to be said twice
            continue
        if isinstance(top, dict) and "state_dict" in top:
            raise MetaGPTError(
                f"model {path} holds its tensors under 'state_dict': mergekit-pytorch 0.1.5 lists the tensors "
                f"inside it but reads them at the file's top level (a KeyError mid-merge, whatever the method); "
                f"save the state dict itself (torch.save(checkpoint['state_dict'], path))")
        scalar = next((k for k, v in top.items() if k in planned and isinstance(v, torch.Tensor) and v.dim() == 0),
                      None) if isinstance(top, dict) and getattr(cache, "lazy_unpickle", False) else None
        if scalar is not None:
            raise MetaGPTError(
                f"model {path} holds a 0-dimensional tensor, {scalar!r}, which mergekit 0.1.5's --lazy-unpickle "
                f"cannot read (TypeError: reduce() of empty iterable, mid-merge, whatever the method): merge "
                f"without --lazy-unpickle")


def check_output_writable(out_path) -> None:
    """The output folder can take files, before the pre-pass reads every model (a read-only
    mount, an immutable folder or a file in its way: mergekit fails at its first shard,
    with a traceback). A file is made in it, or in the nearest folder above it that exists
    where it does not, and removed at once (the folders the output lock made for the merge
    go when a check fails: a merge that fails before mergekit writes leaves no folder)."""
    if not isinstance(out_path, (str, os.PathLike)):
        return
    from mergekit_metagpt.atomic_files import new_file

    folder = os.path.abspath(out_path)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    probe = None
    try:
        if not os.path.isdir(folder):  # a file (or a broken link) in its way
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
        fd, probe = new_file(folder, ".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        left = f" (its test file {probe} could not be removed)" if probe and os.path.lexists(probe) else ""
        raise MetaGPTError(f"cannot write into the output folder {out_path}: "
                           f"{error.strerror or error}{left}; give a folder this user can write") from None


def check_device_there(options) -> None:
    """A CUDA device asked for (``--cuda``, ``--device cuda…``) where torch finds none, or
    ``--multi-gpu``/``--gpu-rich`` where torch finds no accelerator at all (mergekit's
    multi-GPU executor takes any, e.g. ``--device xpu``): one line, before anything is read
    (mergekit's own failures come later: torch's "Torch not compiled with CUDA enabled", or
    for ``--multi-gpu`` "'NoneType' object has no attribute 'type'")."""
    import torch

    device = str(getattr(options, "device", None) or "")
    multi = bool(getattr(options, "multi_gpu", False))
    if device.startswith("cuda") and not torch.cuda.is_available():
        asked = ("--gpu-rich" if getattr(options, "gpu_rich", False) else "--multi-gpu" if multi
                 else "--cuda" if getattr(options, "cuda", False) else f"--device {device}")
        what = "CUDA device"
    elif multi and not _accelerator_there(torch):
        asked, what = ("--gpu-rich" if getattr(options, "gpu_rich", False) else "--multi-gpu"), "GPU"
    else:
        return
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        build = "a CPU build"
    else:
        build = f"built for {'ROCm ' + torch.version.hip if getattr(torch.version, 'hip', None) else 'CUDA ' + torch.version.cuda}, no GPU visible"
    raise MetaGPTError(f"{asked}: torch finds no {what} here (torch {torch.__version__}, {build}); "
                       f"merge without it, on the CPU")


def _accelerator_there(torch) -> bool:
    """Whether torch finds an accelerator of any kind (CUDA, ROCm, XPU …)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:  # torch < 2.6: mergekit takes torch.cuda then
        return torch.cuda.is_available()
    try:
        return accelerator.current_accelerator() is not None and accelerator.device_count() > 0
    except Exception:
        return torch.cuda.is_available()


def check_models_open(config, options) -> dict:
    """Each model of the recipe is there, its config loads and its loader opens, or one
    line naming the model, before anything is read for the merge; the fingerprints of
    their files then (``open_loaders``)."""
    _check_models_load(config, options)
    keys = open_loaders(config, options)
    _check_card_can_name_models(config, options)
    return keys


def _check_card_can_name_models(config, options) -> None:
    """A local folder written as a hub id would be (``fam/model``, ``model``): mergekit's
    model card step asks the hub whether it is one (``repo_exists``), after every weight
    is written, and with ``HF_HUB_OFFLINE=1`` that fails, ending the merge with an error
    and no card: refused before (``./fam/model`` is taken as a folder). Otherwise a warning:
    the same question fails without network, and a hub model of that name would be the one
    the card names."""
    if not getattr(options, "write_model_card", False):
        return
    from huggingface_hub.utils import validate_repo_id

    offline = switched_on("HF_HUB_OFFLINE")

    for model in models_in_order(config):
        for path in (model.model.path, model.lora.path if model.lora else None):
            if not path or path[0] in "/~." or path.count("/") > 1 or not os.path.exists(path):
                continue
            try:
                validate_repo_id(path)
            except Exception:  # not a hub id: mergekit's card takes it for a folder
                continue
            if offline:
                raise MetaGPTError(
                    f"model {model}: the local folder {path} is written as a hub id would be, and "
                    f"mergekit's model card step asks the hub about it after the weights are written, "
                    f"which fails with HF_HUB_OFFLINE=1; {_write_it_as(path)}"
                )
            LOG.warning(
                "MetaGPT: model %s: the local folder %s is written as a hub id would be; mergekit's model card "
                "step asks the hub about it after the weights are written, which fails without network (and a "
                "hub model of that name would be the one the card names); %s", model, path, _write_it_as(path))


def _write_it_as(path: str) -> str:
    """What to do about a local folder written as a hub id: mergekit-multi writes its
    intermediate merges' folders as ``-I``'s folder joined with their names, which the
    user never wrote: ``-I inter`` gives ``inter/first``."""
    folder = os.path.dirname(path)
    multi = f", or, for an intermediate merge of mergekit-multi, pass -I ./{folder}" if folder else ""
    return f"write it as ./{path}{multi} (or pass --no-write-model-card)"


def plan_recipe(config, options):
    """The MergeRun of a MetaGPT recipe (a validated MergeConfiguration)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.plan import MergePlanner

    import mergekit_metagpt  # noqa: F401  (registers the methods)
    from mergekit_metagpt import merge_plan
    from mergekit_metagpt.integration import RunContext
    from mergekit_metagpt.recipe_checks import check_config, check_module_names

    check_config(config)
    _check_models_load(config, options)
    try:
        from mergekit.merge import _model_out_config
    except ImportError as error:  # pragma: no cover - mergekit changed shape
        raise MetaGPTError(f"this mergekit has no _model_out_config ({error}); cannot plan") from None
    arch_info = get_architecture_info(config, options)
    check_module_names(config, arch_info, options)
    input_keys = open_loaders(config, options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # plan_to_disk only builds tasks (nothing is written until they execute);
    # mergekit 0.1.5's plan_in_memory cannot wrap its own merge tasks.
    tasks = [getattr(t, "tensor_task", None) for t in planner.plan_to_disk(out_path="unused")]
    mine = merge_plan.ours(tasks)
    if not mine:  # a mergekit whose plan holds its merge tasks elsewhere: nothing to report
        import importlib.metadata

        raise MetaGPTError(
            f"no {config.merge_method} task found in mergekit's plan of this recipe: the plugin "
            f"knows the plans of mergekit 0.1.5, this is mergekit {importlib.metadata.version('mergekit')}"
        )
    run = merge_plan.MergeRun(
        config.merge_method, mine, RunContext(out_path=None, config=config, options=options, input_keys=input_keys)
    )
    run.merge_executes_plan = False  # planned for a command: its pre-pass alone reads the inputs
    run.check()
    return run
