"""GPU KV sizing (issue 15): the budget is read after a full max_num_batched_tokens step was profiled, as vLLM's
determine_available_memory does. No GPU here: the device's memory is a fake that books allocations the way
torch's caching allocator reports them; the profile step itself runs for real on CPU."""
import pytest
import torch

from hfbridge import LLM
from hfbridge.config import CacheConfig, SchedulerConfig
from hfbridge.worker.kv_cache_sizing import DeviceMemory, bytes_per_block, determine_num_blocks, gpu_kv_budget
from hfbridge.worker.layer_probe import LayerSpec
from hfbridge.worker.profile_run import profile_step_lengths, run_profile_step

GiB = 1 << 30


class FakeDevice:
    """total 80 GiB; another process holds 2 GiB; our weights 10 GiB. A profiled step peaks at +6 GiB of
    activations, which stay in torch's cache (not free for the driver) until released."""

    def __init__(self):
        self.total, self.others, self.allocated, self.cached = 80 * GiB, 2 * GiB, 10 * GiB, 0
        self.peak = self.allocated
        self.events = []

    def profile_step(self):
        self.events.append("profile")
        self.peak = max(self.peak, self.allocated + 6 * GiB)
        self.cached += 6 * GiB  # freed by the step, kept by the allocator

    # DeviceMemoryProbe
    def reset_peak(self):
        self.events.append("reset")
        self.peak = self.allocated

    def release_cached(self):
        self.events.append("release")
        self.cached = 0

    def snapshot(self):
        self.events.append("snapshot")
        free = self.total - self.others - self.allocated - self.cached
        return DeviceMemory(self.total, free, self.allocated, self.peak)


LAYERS = {i: LayerSpec(num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, is_causal=True) for i in range(32)}


def test_budget_arithmetic():
    memory = DeviceMemory(total=80 * GiB, free=68 * GiB, allocated=10 * GiB, peak_allocated=16 * GiB)
    # 0.9 x 80 = 72 GiB for the engine; 12 GiB used now; 6 GiB of activation peak to keep free.
    assert gpu_kv_budget(memory, 0.9) == int(0.9 * 80 * GiB) - 12 * GiB - 6 * GiB


def test_the_full_step_is_profiled_before_the_cache_is_sized():
    device = FakeDevice()
    scheduler = SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=100_000, max_model_len=4096)
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.9)
    num_blocks = determine_num_blocks(LAYERS, cache, scheduler, torch.device("cuda"), device.profile_step, device)
    assert device.events == ["reset", "profile", "release", "snapshot"]
    budget = int(0.9 * 80 * GiB) - 12 * GiB - 6 * GiB  # the profiled activations are kept free
    assert num_blocks == budget // bytes_per_block(LAYERS, 16)

    unprofiled = FakeDevice()  # what sizing without the profile step would have taken: 6 GiB more
    more = determine_num_blocks(LAYERS, cache, scheduler, torch.device("cuda"), lambda: None, unprofiled)
    assert (more - num_blocks) * bytes_per_block(LAYERS, 16) == pytest.approx(6 * GiB, abs=bytes_per_block(LAYERS, 16))


def test_cpu_sizing_runs_no_profile():
    def fail():
        raise AssertionError("CPU sizing must not profile")

    scheduler = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64)
    cache = CacheConfig(block_size=16, kv_cache_memory_bytes=64 << 20)
    assert determine_num_blocks(LAYERS, cache, scheduler, torch.device("cpu"), fail) == 4 * 4  # capped at useful


def test_profile_step_runs_a_full_token_budget(tiny_llama):
    llm = LLM(model=str(tiny_llama[1]), max_model_len=48, max_num_batched_tokens=100, max_num_seqs=7)
    runner = llm.llm_engine.executor.runner
    scheduler_config = llm.llm_engine.config.scheduler_config
    assert profile_step_lengths(scheduler_config) == [48, 48, 4]
    seen = []
    model = runner.model
    real_forward = model.forward

    def spy(input_ids, positions, logits_indices, *args, **kwargs):
        logits = real_forward(input_ids, positions, logits_indices, *args, **kwargs)
        seen.append((input_ids.shape, int(positions.max()), logits.shape))
        return logits

    model.forward = spy
    run_profile_step(model, scheduler_config, runner.sampler, torch.device("cpu"))
    assert seen == [(torch.Size([1, 100]), 47, torch.Size([7, 384]))]


def test_available_ram_is_what_the_kernel_reports(monkeypatch):
    """The CPU KV budget's source: psutil, which works where os.sysconf("SC_AVPHYS_PAGES") does not (macOS); on
    Linux it must agree with the kernel's own MemAvailable (within what a few ms of other processes change)."""
    import os

    from hfbridge.worker import kv_cache_sizing

    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(f"unrecognized {name}")))
    ours = kv_cache_sizing._available_ram()
    with open("/proc/meminfo") as f:
        kernel = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(ours - kernel) < 0.05 * kernel
