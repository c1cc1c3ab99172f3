"""engine-plan's memory prediction against a real GPU: configs/lgt_4070.toml's training step at
batch 16 and 48, torch.cuda.max_memory_allocated / max_memory_reserved over two steady-state
steps (the optimizer state made by a first step) against the plan's peak allocated and reserved
before the first sample grid. The latents are random, of the recipe's shapes (2048 x 4x32x32
fp16, 12 styles): memory depends on shapes alone. Skipped without a GPU; the figures go to
bench/results/plan_accuracy_<device>.json.

    pytest bench/bench_plan_accuracy.py -s        # on a GPU
"""

import json
from pathlib import Path

import pytest
import torch
from common import device_name, on_gpu

from engine.config import load_config
from engine.data.latents import AutoencoderIdentity, LatentFile, write_latents
from engine.distributed import World
from engine.plan import gpu, make_plan
from engine.train import setup, train_step

pytestmark = pytest.mark.skipif(not on_gpu(), reason="compares the plan with CUDA's own memory statistics")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def spec_of_this_gpu() -> str:
    """The spec table's GPU of this device's architecture (the SDPA backend the plan picks depends on it)."""
    capability = torch.cuda.get_device_capability()
    return "h100" if capability >= (9, 0) else "a100" if capability == (8, 0) else "rtx4090"


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan_accuracy") / "latents.safetensors"
    generator = torch.Generator().manual_seed(0)
    write_latents(path, LatentFile(torch.randn(2048, 4, 32, 32, generator=generator).half(),
                                   torch.arange(2048) % 12, [f"style{i}" for i in range(12)], 1.0,
                                   AutoencoderIdentity("random", "-"), "mean"))
    return path


@pytest.mark.parametrize("batch", [16, 48])
def test_plan_predicts_cuda_memory(batch, latents, tmp_path):
    cfg = load_config(ROOT / "configs" / "lgt_4070.toml",
                      [f"--data.source=latents:{latents}", f"--train.batch_size={batch}", "--sample.every=0",
                       f"--run.dir={tmp_path / 'run'}", "--log.tensorboard=false", "--train.device=cuda"])
    session = setup(cfg, World())
    train_step(session)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        train_step(session)
    torch.cuda.synchronize()
    measured = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    memory = make_plan(cfg, gpu(spec_of_this_gpu()), levers=False).configured.memory
    predicted = {"allocated": memory.peak_allocated, "reserved": memory.steps_reserved}
    row = {"device": device_name(), "batch": batch, "measured": measured, "predicted": predicted,
           "error": {k: predicted[k] / measured[k] - 1 for k in measured}}
    print(json.dumps(row))
    out = RESULTS / f"plan_accuracy_{device_name().replace(' ', '_')}.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([r for r in rows if r["batch"] != batch] + [row], indent=1))
    assert abs(row["error"]["allocated"]) < 0.10
