"""CUDA: the pre-pass on the GPU, matching the CPU merge. The `cuda`-marked tests are
skipped without a GPU; the checks of the CUDA-only code that a CPU can run (the pinned
staging's allocations) run everywhere."""

import json

import pytest
import torch

from checkpoints import closed_form
from merging import recipe, run_recipe
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt import prepass

MODELS = ["model0", "model1", "model2"]


def on_cuda(test):
    """A test that needs a CUDA GPU: marked `cuda`, skipped without one."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.cuda(test)


def spy_pinned(monkeypatch) -> list:
    """The device and pinning of each pinned buffer the staging allocates, as it runs."""
    from mergekit_metagpt import staging

    allocated = []
    real = staging.pinned_buffer

    def pinned_buffer(nbytes):
        buffer = real(nbytes)
        allocated.append((buffer.device.type, buffer.is_pinned()))
        return buffer

    monkeypatch.setattr(staging, "pinned_buffer", pinned_buffer)
    return allocated


@on_cuda
@pytest.mark.parametrize("read_to_gpu, low_cpu_memory, multi_gpu", [
    (False, False, False),
    (True, False, False),
    (True, True, False),
    (False, False, True),  # --multi-gpu: workers run under `with torch.device(gpu)`
    (True, True, True),  # --gpu-rich (with --cuda)
])
def test_cuda_merge_matches_cpu(read_to_gpu, low_cpu_memory, multi_gpu, llama_family_bf16, tmp_path, monkeypatch):
    from mergekit.options import MergeOptions

    from mergekit_metagpt import staging

    # no norm cache, no memo: the GPU merge must run its own pre-pass, on the GPU
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    paths, sds = llama_family_bf16
    config = recipe(paths, MODELS, dtype="bfloat16")
    runs = prepass.STATS.runs
    cpu = run_recipe(config, str(tmp_path / "cpu"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert prepass.STATS.runs == runs + 1 and prepass.STATS.last_device == "cpu"
    LoaderCache().flush_all()
    torch.cuda.reset_peak_memory_stats()
    pinned = spy_pinned(monkeypatch)
    gpu = run_recipe(config, str(tmp_path / "gpu"), MergeOptions(
        copy_tokenizer=False, quiet=True, device="cuda", read_to_gpu=read_to_gpu, low_cpu_memory=low_cpu_memory,
        multi_gpu=multi_gpu,
    ))
    assert prepass.STATS.runs == runs + 2, "the GPU merge did not run its own pre-pass"
    assert prepass.STATS.last_device.startswith("cuda"), prepass.STATS.last_device
    if read_to_gpu:  # every tensor is read onto the GPU: nothing goes through the staging
        assert pinned == [], "pinned host buffers allocated although no tensor was staged"
    else:  # each slot pinned once, on the CPU
        assert 0 < len(pinned) <= staging.SLOTS and set(pinned) == {("cpu", True)}, pinned
    # both against the float64 closed form: λ in the record, weights within one bf16 ulp
    lams, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    for out, merged in (("cpu", cpu), ("gpu", gpu)):
        with open(tmp_path / out / "metagpt_coefficients.json") as f:
            rows = json.load(f)["merges"][0]["models"]
        assert [row["lambda"] for row in rows] == pytest.approx(lams, abs=1e-6), out
        for name, ref in reference.items():
            expected = ref.to(torch.bfloat16).float()
            ulp = expected.abs().clamp(min=1e-6) * 2 ** -7
            assert bool(((merged[name].float() - expected).abs() <= ulp).all()), (out, name)


def planned_norms(paths, device):
    """The pre-pass of a planned recipe (as `mergekit-metagpt coefficients` runs it)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_metagpt.planning import plan_recipe

    config = MergeConfiguration.model_validate(recipe(paths, MODELS))
    run = plan_recipe(config, MergeOptions(quiet=True))
    (set_norms,) = prepass.compute(run, torch.device(device)).sets
    return {str(model): norm for model, norm in set_norms.coefficients.squared_norms}


@on_cuda
def test_prepass_on_gpu_uses_a_few_tensors_of_memory(tmp_path, monkeypatch):
    """The pre-pass's peak GPU memory is one task's tensors and the float32 chunks, far
    below one model. The model is built here, 147 tensors and 4 MB in float32 (the
    fixtures' 78 KB model would fit whole under any bound with the allocator's slack)."""
    from checkpoints import perturbed, random_state_dict, save_checkpoint

    from mergekit_metagpt.scratch import CHUNK
    from mergekit_metagpt.staging import PinnedStaging

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=16)
    base = random_state_dict(7, dtype=torch.float32, **shape)
    sds = {"base": base}
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base, shard_size="1MB", **shape)}
    for i, scale in enumerate((0.01, 0.03, 0.1)):
        name = MODELS[i]
        sds[name] = perturbed(base, scale, seed=200 + i)
        paths[name] = save_checkpoint(str(tmp_path / name), sds[name], shard_size="1MB", **shape)

    staged = []
    to_device = PinnedStaging.to_device
    monkeypatch.setattr(PinnedStaging, "to_device", lambda self, t: staged.append(t.nbytes) or to_device(self, t))
    prepass.clear_memo()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    runs = prepass.STATS.runs
    norms = planned_norms(paths, "cuda")
    assert prepass.STATS.runs == runs + 1 and prepass.STATS.last_device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() - start

    # What the pre-pass holds (prepass._task_norms, norms.task_vector_sums, scratch):
    # - one task's tensors as loaded, the base's and each model's (T = 3), freed before
    #   the next task's are read;
    # - float32 scratch of one chunk (at most CHUNK elements, here the tensor) per slot:
    #   the base's chunk, the T stacked deltas and the product of the elementwise Gram
    #   path (the GPU's); a slot that grows to a larger tensor allocates its new buffer
    #   while the old one is still referenced, so twice that at a moment;
    # - per task, until the accumulator's finish: its 3x3 float64 Gram matrix (the inner
    #   products are views of it), the T norms' 0-d sums and the base's, 512 bytes each
    #   (the CUDA caching allocator rounds every allocation up to 512 bytes, and
    #   max_memory_allocated counts the rounded sizes);
    # - 0-d temporaries (sums, zeros), a few at a time: 64 of 512 bytes.
    # Then 1.5x for what this count may miss (it has not been measured on a GPU).
    models = len(MODELS)
    tensors = len(base)
    largest = max(t.numel() for t in base.values())
    held = (1 + models) * max(t.nbytes for t in base.values())
    scratch = 2 * (1 + models + 1) * min(largest, CHUNK) * 4
    results = tensors * (2 + models) * 512
    bound = int(1.5 * (held + scratch + results + 64 * 512))
    model_bytes = sum(t.nbytes for t in base.values())
    assert 2 * bound < model_bytes, (bound, model_bytes)  # the bound tells a task from a model
    assert peak <= bound, dict(peak=peak, bound=bound, held=held, scratch=scratch, results=results,
                               model_bytes=model_bytes)
    assert sum(staged) == 4 * model_bytes, "CPU-loaded tensors should reach the GPU through the pinned staging"
    expected = sum(float((sds["model2"][k].double() - base[k].double()).pow(2).sum()) for k in base)
    assert abs(norms[paths["model2"]] - expected) / expected < 1e-5


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_pinned_staging_copies_exactly(dtype):
    """Tensors of many chunks, queued back to back through two small buffers (each
    reused while earlier transfers may still be in flight), arrive bit for bit."""
    from mergekit_metagpt.staging import PinnedStaging

    staging = PinnedStaging(torch.device("cuda"), chunk_bytes=1000, slots=2)
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-1000, 1000, (n,), generator=generator).to(dtype) for n in (0, 1, 499, 5000, 123457)]
    tensors.append(torch.randn(300, 70, generator=generator).to(dtype).t())  # not contiguous
    moved = [staging.to_device(t) for t in tensors]
    staging.close()
    for tensor, out in zip(tensors, moved):
        assert out.device.type == "cuda" and out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out.cpu(), tensor)


class _PinnedRequests(torch.overrides.TorchFunctionMode):
    """Records the device each pinned allocation is asked on (after any
    ``with torch.device(...)`` inside it has filled in its device), and makes it an
    unpinned CPU tensor (a CPU-only build has no pinned allocator)."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("pin_memory"):
            device = kwargs.get("device")
            self.devices.append(None if device is None else torch.device(device))
            kwargs.update(pin_memory=False, device="cpu")
        return func(*args, **kwargs)


class _FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


def test_pinned_buffers_are_allocated_on_the_cpu_when_first_used(monkeypatch):
    """mergekit's --multi-gpu runs each worker under ``with torch.device(gpu)``, which
    gives its device to every allocation that names none: a pinned buffer asked without
    ``device="cpu"`` would be a GPU tensor, which CUDA refuses to pin. Here 'meta' stands
    in for the GPU (the same torch.device context), and the staging copies CPU to CPU
    with CUDA's events faked, so that this runs without a GPU. Nothing is pinned until
    a tensor comes through (with --read-to-gpu, none does)."""
    from mergekit_metagpt import staging

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    tensor, small = torch.arange(40, dtype=torch.float32), torch.tensor([1.5])
    requests = _PinnedRequests()
    with requests, torch.device("meta"):
        ring = staging.PinnedStaging(torch.device("cpu"), chunk_bytes=16, slots=3)
        assert requests.devices == [], "pinned before any tensor came through"
        out = ring.to_device(tensor)  # 10 chunks through 3 slots
        assert ring.to_device(small).tolist() == [1.5]
        ring.close()
    assert requests.devices == [torch.device("cpu")] * 3, requests.devices
    assert out.device.type == "cpu" and torch.equal(out, tensor)


@on_cuda
def test_norm_accumulator_takes_values_on_several_devices():
    """An in-memory merge may hold some groups on a GPU, others on the CPU: the
    accumulator's values then sit on both, and a NaN is still named."""
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.norms import NormAccumulator

    accumulator = NormAccumulator(["m"])
    accumulator.add("m", "on gpu", torch.tensor(1.5, dtype=torch.float64, device="cuda"))
    accumulator.add("m", "on cpu", torch.tensor(2.5, dtype=torch.float32))
    assert accumulator.finish() == {"m": {"on gpu": 1.5, "on cpu": 2.5}}
    accumulator.add("m", "nan", torch.tensor(float("nan"), device="cuda"), name="layer.nan")
    with pytest.raises(MetaGPTError, match="layer.nan"):
        accumulator.finish()
    same = NormAccumulator(["m"])  # all on the GPU: stacked there, one copy to the host
    same.add("m", "a", torch.tensor(3.0, device="cuda"))
    same.add("m", "b", torch.tensor(4.0, dtype=torch.float64, device="cuda"))
    assert same.finish() == {"m": {"a": 3.0, "b": 4.0}}


@on_cuda
def test_inspect_on_gpu_matches_cpu(llama_family, tmp_path, monkeypatch):
    """Norms and inner products (cosines) computed on the GPU equal the CPU's."""
    import json

    from merging import write_yaml
    from mergekit_metagpt.cli import main

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    paths, _ = llama_family
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    found = {}
    for device in ("cpu", "cuda"):
        prepass.clear_memo()
        flags = ["--cuda"] if device == "cuda" else []
        assert main(["inspect", config, str(tmp_path / device), "--no-pictures", *flags]) == 0
        with open(tmp_path / device / "metagpt-inspect.json") as f:
            (found[device],) = json.load(f)["merges"]
    assert prepass.STATS.last_device.startswith("cuda")
    cpu, gpu = found["cpu"], found["cuda"]
    for a, b in zip(cpu["squared_norms"], gpu["squared_norms"]):
        assert abs(a - b) <= 1e-5 * a
    for row_cpu, row_gpu in zip(cpu["cosine"], gpu["cosine"]):
        for a, b in zip(row_cpu, row_gpu):
            assert a is not None and abs(a - b) <= 1e-6
