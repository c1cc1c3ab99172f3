"""Image-folder loading: the DALI pipeline (engine/data/dali.py) against the torch DataLoader with 2
workers, both drawing the engine's training batches (resize the shorter side to 224, random crop,
random flip, [-1, 1]; batch 32) from one folder of 512 JPEGs of 256 x 320 px, measured in one run:
images/s of each, median of interleaved rounds, and their ratio. DALI decodes with 2 threads, on
the GPU where there is one (the DataLoader's batches are then copied there, as in training).

    pytest bench/bench_loader.py -s                    # figures -> bench/results/loader-<cpu|gpu>.json
    pytest bench/bench_loader.py --benchmark-disable   # a smoke test: a few images through each (CI)
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common import device_name, on_gpu
from PIL import Image

from engine.data.dali import DaliImageFolderSource, dali_problem
from engine.data.images import ImageFolderSource

RESULTS = Path(__file__).resolve().parent / "results"
NUM_IMAGES, SMOKE_IMAGES = 512, 6
HEIGHT, WIDTH = 256, 320
IMAGE_SIZE, BATCH_SIZE, WORKERS = 224, 32, 2
ROUNDS, BATCHES_PER_ROUND = 5, NUM_IMAGES // BATCH_SIZE  # a round draws one epoch
DEVICE = "cuda" if on_gpu() else "cpu"


def jpeg_folder(root: Path, count: int) -> Path:
    """`count` JPEGs (quality 90) of structured pixels, gradients plus noise, in 4 class folders."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rng = np.random.default_rng(0)
    for i in range(count):
        phase = i / count * 2 * np.pi
        base = np.stack([np.sin(x / 23 + phase), np.cos(y / 31 - phase), np.sin((x + y) / 47 + 2 * phase)], -1)
        pixels = np.clip(128 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def make_source(loader: str, root: Path):
    if loader == "torch":
        return ImageFolderSource(root, IMAGE_SIZE, flip=True, seed=0, num_workers=WORKERS)
    if dali_problem() is not None:
        pytest.skip(f"DALI cannot run here: {dali_problem()} (pip install -e '.[dali]')")
    return DaliImageFolderSource(root, IMAGE_SIZE, flip=True, seed=0, num_workers=WORKERS, device=DEVICE)


def draw(batches, count: int) -> None:
    """Draw `count` batches onto DEVICE and wait for them."""
    for batch in itertools.islice(batches, count):
        batch.to(DEVICE)
    if on_gpu():
        torch.cuda.synchronize()


def measure(root: Path) -> dict:
    import nvidia.dali  # make_source has skipped the test where it does not import

    streams = {loader: make_source(loader, root).batches(0, BATCH_SIZE) for loader in ("torch", "dali")}
    for batches in streams.values():
        draw(batches, 2)  # started: DataLoader workers forked, DALI pipeline built, first batches in flight
    seconds = {loader: [] for loader in streams}
    for _ in range(ROUNDS):  # interleaved, so that a busy machine slows both alike
        for loader, batches in streams.items():
            start = time.perf_counter()
            draw(batches, BATCHES_PER_ROUND)
            seconds[loader].append(time.perf_counter() - start)
    rates = {loader: BATCHES_PER_ROUND * BATCH_SIZE / statistics.median(times) for loader, times in seconds.items()}
    return {"device": device_name(), "dali_decode": "GPU" if on_gpu() else "CPU",
            "versions": {"torch": torch.__version__, "nvidia-dali": nvidia.dali.__version__},
            "folder": f"{NUM_IMAGES} JPEGs (quality 90) of {HEIGHT}x{WIDTH} px",
            "batch": f"{BATCH_SIZE} crops of {IMAGE_SIZE} px (resize, random crop, random flip)",
            "workers": WORKERS, "rounds": ROUNDS, "images_per_round": BATCHES_PER_ROUND * BATCH_SIZE,
            "images_per_s": rates, "dali_vs_torch": rates["dali"] / rates["torch"]}


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loader_draws_training_batches(loader, benchmark, tmp_path):
    """Smoke (CI): a few images through each loader."""
    if not benchmark.disabled:
        pytest.skip("measured by test_loader_throughput")
    source = make_source(loader, jpeg_folder(tmp_path, SMOKE_IMAGES))
    batch = benchmark.pedantic(lambda: next(source.batches(0, 4)), rounds=1, iterations=1)
    assert batch.x.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and -1 <= batch.x.min() and batch.x.max() <= 1


def test_loader_throughput(benchmark, tmp_path):
    """The figures, measured in one run, written to bench/results/loader-<cpu|gpu>.json."""
    if benchmark.disabled:
        pytest.skip("figures only when benchmarks are enabled")
    result = benchmark.pedantic(measure, args=(jpeg_folder(tmp_path, NUM_IMAGES),), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    rates = result["images_per_s"]
    print(f"\nimage-folder loading on {result['device']}: {result['folder']}, {result['batch']}, "
          f"median of {ROUNDS} epochs:")
    print(f"  torch DataLoader, {WORKERS} workers: {rates['torch']:8.1f} images/s")
    print(f"  DALI ({result['dali_decode']} decode), {WORKERS} threads: {rates['dali']:8.1f} images/s")
    print(f"  DALI / torch: {result['dali_vs_torch']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"loader-{'gpu' if on_gpu() else 'cpu'}.json").write_text(json.dumps(result, indent=1) + "\n")
