"""Drawing training batches of latents: the device-resident `LatentSource` (a seeded gather on the
device) vs a torch DataLoader (TensorDataset, shuffle, batch 48) over the same tensors, kept on
the host and copied per batch (the usual set-up) or kept on the device. Also the style index's
reference draw (one real latent of a requested style per row), which LGT makes every step.
Each case records rows/s and median ms per batch in pytest-benchmark's extra_info.

GPU:  pytest bench/bench_latent_sampling.py --benchmark-json=bench/results/<device>.json
CPU:  pytest bench/bench_latent_sampling.py --benchmark-disable   (a smoke test: 2k latents)
"""

import itertools

import pytest
import torch
from common import median_ms, on_gpu, record
from torch.utils.data import DataLoader, TensorDataset

from engine.data.latents import AutoencoderIdentity, LatentSource

NUM_LATENTS = 50_000 if on_gpu() else 2_000
LATENT_SHAPE = (4, 32, 32)
NUM_STYLES = 12
BATCH_SIZE = 48
BATCHES_PER_CALL = 50 if on_gpu() else 3  # one timed call draws this many batches
DEVICE = "cuda" if on_gpu() else "cpu"


@pytest.fixture(scope="module")
def host_tensors():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(NUM_LATENTS, *LATENT_SHAPE, generator=generator).half()  # stored as fp16
    labels = torch.randint(NUM_STYLES, (NUM_LATENTS,), generator=generator)
    return latents, labels


def latent_source(latents, labels):
    names = [f"style{i}" for i in range(NUM_STYLES)]
    return LatentSource(latents.to(DEVICE), labels.to(DEVICE), names, 1.0, AutoencoderIdentity("-", "-"), seed=0)


def drawing(batches):
    """A call that draws BATCHES_PER_CALL fp32 batches on the device and waits for them."""
    def run():
        for x, labels in itertools.islice(batches, BATCHES_PER_CALL):
            x.float()
        if on_gpu():
            torch.cuda.synchronize()
    return run


def endless(loader):
    """Batches of a DataLoader forever (a new shuffled epoch whenever one ends), moved to DEVICE."""
    while True:
        for x, labels in loader:
            yield x.to(DEVICE, non_blocking=True).float(), labels.to(DEVICE, non_blocking=True)


def make_case(name, host_tensors):
    latents, labels = host_tensors
    if name == "latent_source":
        return drawing((b.x, b.labels) for b in latent_source(latents, labels).batches(0, BATCH_SIZE))
    if name == "style_reference":
        source = latent_source(latents, labels)
        generator = torch.Generator(DEVICE).manual_seed(0)
        styles = torch.randint(NUM_STYLES, (BATCH_SIZE,), device=DEVICE)
        return drawing((source.sample_style_reference(styles, generator), styles) for _ in itertools.count())
    if name == "dataloader_host":
        loader = DataLoader(TensorDataset(latents, labels), batch_size=BATCH_SIZE, shuffle=True,
                            pin_memory=on_gpu())
        return drawing(endless(loader))
    if name == "dataloader_device":
        loader = DataLoader(TensorDataset(latents.to(DEVICE), labels.to(DEVICE)), batch_size=BATCH_SIZE,
                            shuffle=True)
        return drawing(endless(loader))
    raise ValueError(name)


@pytest.mark.parametrize("implementation", ["latent_source", "style_reference", "dataloader_host",
                                            "dataloader_device"])
def test_latent_batch_sampling(benchmark, host_tensors, implementation):
    fn = make_case(implementation, host_tensors)
    ms = median_ms(fn) if on_gpu() else median_ms(fn, warmup=0, rep=1)
    rows = BATCHES_PER_CALL * BATCH_SIZE
    record(benchmark, implementation=implementation, num_latents=NUM_LATENTS, latent_shape=list(LATENT_SHAPE),
           stored_dtype="float16", batch_size=BATCH_SIZE, median_ms_per_batch=ms / BATCHES_PER_CALL,
           rows_per_s=rows / (ms * 1e-3))
    benchmark.pedantic(fn, rounds=10 if on_gpu() else 1, warmup_rounds=1 if on_gpu() else 0)
