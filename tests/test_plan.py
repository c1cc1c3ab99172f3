"""engine-plan: the step on fake tensors against the real step, scaling across batch sizes, the CUDA
code paths it takes, every method, budgets and levers, and the command line."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_lgt import TINY_ENERGY, TINY_MODEL, write_synthetic_latents
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from engine.commands import plan as plan_command
from engine.commands import train as train_command
from engine.config import load_config
from engine.distributed import World
from engine.methods import METHODS
from engine.plan import gpu, make_plan, parse_bytes
from engine.plan.costs import TRITON_KERNELS
from engine.plan.cuda_paths import (
    cuda_autocast_on_cpu,
    cuda_sdpa_backend,
    triton_kernel_modules,
    triton_kernels,
)
from engine.plan.memory import replay
from engine.plan.planner import UNTRACED
from engine.plan.roofline import roofline
from engine.plan.scaling import at_batch
from engine.plan.step import trace_step
from engine.train import setup, train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RTX4070 = gpu("rtx4070-laptop")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_synthetic_latents(tmp_path_factory.mktemp("plan") / "latents.safetensors", [6, 6, 6], seed=0)


def tiny_lgt(latents: Path, run_dir: Path, *extra: str):
    return load_config(None, ["--method.name=lgt", f"--data.source=latents:{latents}", f"--run.dir={run_dir}",
                              "--lgt.holdout_per_style=1", "--sample.num=2", "--log.tensorboard=false",
                              *TINY_MODEL, *TINY_ENERGY, *extra])


def cpu_allocator_peak(step) -> int:
    """The most bytes the CPU allocator held during `step()` beyond what it held before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    totals = []

    def walk(nodes):
        for node in nodes:
            if node.typed[0] == _EventType.Allocation:
                totals.append(node.typed[1].total_allocated)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return max(totals)


def planned_step_peak(trace) -> int:
    """The most bytes live during the traced step beyond what was live when it began."""
    step, grid = trace.marks["step"][0], trace.marks["grid"][0]
    live = base = sum(n for _, n in trace.events[:step])
    peak = live
    for _, n in trace.events[step:grid]:
        live += n
        peak = max(peak, live)
    return peak - base


def test_plan_matches_the_cpu_allocator_within_5_percent(latents, tmp_path):
    """The same step, for real on the CPU (CPU code paths, fp32) and on fake tensors: the plan's live
    peak against the CPU allocator's, measured by torch.profiler. The real run's first step creates
    the optimizer state, which the plan's traced step finds already made."""
    cfg = tiny_lgt(latents, tmp_path / "run", "--train.batch_size=4", "--sample.every=0", "--train.device=cpu")
    session = setup(cfg, World())
    train_step(session)
    real = cpu_allocator_peak(lambda: train_step(session))
    planned = planned_step_peak(trace_step(cfg, target="cpu", sample_grid=False))
    assert abs(planned - real) / real < 0.05, (planned, real)


def test_two_traces_predict_any_batch_size_exactly(latents, tmp_path):
    cfg = tiny_lgt(latents, tmp_path / "run", "--sample.num=1", "--ode.steps=1")

    def traced(batch, grid=True):
        cfg.train.batch_size = batch
        return trace_step(cfg, sample_grid=grid)

    predicted, direct = at_batch(traced(2), traced(3, grid=False), 6), traced(6)
    memory_a, memory_b = replay(predicted, cuda=True), replay(direct, cuda=True)
    assert (memory_a.peak_allocated, memory_a.peak_reserved, memory_a.peak_live) == \
        (memory_b.peak_allocated, memory_b.peak_reserved, memory_b.peak_live)
    cost_a, cost_b = roofline(predicted, RTX4070), roofline(direct, RTX4070)
    assert (cost_a.step.flops, cost_a.step.bytes, cost_a.step.launches) == \
        (cost_b.step.flops, cost_b.step.bytes, cost_b.step.launches)
    assert cost_a.grid.flops == cost_b.grid.flops > 0


def test_the_plan_takes_the_cuda_code_paths(latents, tmp_path):
    trace = trace_step(tiny_lgt(latents, tmp_path / "run", "--train.batch_size=2"))
    names = {op.name for op in trace.ops}
    kernel_names = {launch.kernel for launch in trace.launches}
    assert {"_group_norm_film_silu_fwd_kernel", "_group_norm_film_silu_bwd_kernel", "_patch_swd_fwd_kernel",
            "_patch_swd_bwd_kernel", "_ssm_fwd_kernel", "_ssm_bwd_kernel"} <= kernel_names
    assert "aten._fused_adamw_" in names and "aten._foreach_norm" in names
    convolutions = [op for op in trace.ops if op.name == "aten.convolution" and op.phase == "forward"]
    assert convolutions and all(op.cost.unit == "tensor" for op in convolutions)  # bf16 autocast
    assert set(trace.attention_backends) <= {"flash", "efficient"}  # never the fp32 math fallback
    assert trace.syncs.get("optimizer") == 1  # the non-finite check's single host read


def test_cross_attention_takes_a_fused_cuda_kernel():
    """Text conditioning's masked cross-attention reaches SDPA in a layout and dtype its
    memory-efficient kernel takes (a mask rules flash out), forward and backward, never the math path."""
    cfg = load_config(CONFIGS / "text_textures.toml", ["--train.batch_size=2", "--sample.every=0"])
    trace = trace_step(cfg)
    assert trace.attention_backends.get("efficient", 0) > 0  # the cross-attention calls
    assert set(trace.attention_backends) <= {"flash", "efficient"}


@pytest.mark.parametrize("op, make_args", [
    ("upsample", lambda t: (torch.nn.functional.interpolate, (t(2, 3, 4, 4, dtype=torch.bfloat16),),
                            {"scale_factor": 2.0, "mode": "nearest"})),
    ("exp", lambda t: (torch.exp, (t(4, dtype=torch.bfloat16),), {})),
    ("sum", lambda t: (torch.sum, (t(4, dtype=torch.bfloat16),), {})),
    ("softmax", lambda t: (torch.softmax, (t(4, 5, dtype=torch.bfloat16), -1), {})),
    ("conv2d", lambda t: (torch.nn.functional.conv2d, (t(1, 3, 5, 5), t(4, 3, 3, 3)), {})),
    ("linear", lambda t: (torch.nn.functional.linear, (t(2, 3), t(4, 3)), {})),
    ("cat", lambda t: (torch.cat, ([t(2, dtype=torch.bfloat16), t(2)],), {})),
    ("mm", lambda t: (torch.mm, (t(2, 3), t(3, 4)), {})),
])
def test_cpu_autocast_casts_as_cuda_autocast_does(op, make_args):
    """CUDA autocast, run on fake CUDA tensors, against the plan's CPU autocast on fake CPU tensors."""
    fake = FakeTensorMode()
    with fake:
        fn, cuda_args, kwargs = make_args(lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype,
                                                                                          device="cuda"))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            expected = fn(*cuda_args, **kwargs).dtype
        finally:
            torch.set_autocast_enabled("cuda", False)
        with cuda_autocast_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
            fn, cpu_args, kwargs = make_args(lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype))
            assert fn(*cpu_args, **kwargs).dtype == expected


@pytest.mark.parametrize("layout, dtype, grad, sm, expected", [
    ("heads-first", torch.bfloat16, True, (8, 9), "flash"),
    ("strided-d", torch.bfloat16, True, (8, 9), "math"),  # d strided by L: no fused kernel
    ("heads-first", torch.float32, False, (8, 9), "efficient"),  # flash needs fp16/bf16
    ("heads-first", torch.bfloat16, True, (7, 5), "math"),  # bf16 kernels need sm_80+
    ("big-d", torch.bfloat16, True, (8, 9), "efficient"),  # d = 256 > 192: flash backward unsupported on sm_89
    ("big-d", torch.bfloat16, True, (9, 0), "flash"),
])
def test_sdpa_backend_choice_follows_cuda_rules(layout, dtype, grad, sm, expected):
    d = 256 if layout == "big-d" else 48
    if layout == "strided-d":
        q = torch.empty(2, 4, d, 64, dtype=dtype).transpose(-1, -2)
    else:
        q = torch.empty(2, 64, 4, d, dtype=dtype).transpose(1, 2)
    q.requires_grad_(grad)
    assert cuda_sdpa_backend(q, q, q, None, 0.0, sm) == expected


def test_every_triton_kernel_has_a_cost_formula():
    launched = {name for module in triton_kernel_modules() for name in triton_kernels(module)
                if name.endswith("_kernel")}
    assert launched == set(TRITON_KERNELS)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.toml")
                                          if not p.stem.endswith(("_gpu", "_4070"))))
def test_every_recipe_is_planned(config, tmp_path):
    """Each method's CPU recipe: a step with forward, backward and optimizer, FLOPs and memory (an image
    folder recipe on a stand-in folder of two classes: the plan reads no image)."""
    cfg = load_config(CONFIGS / config, ["--train.batch_size=2", "--sample.every=0"])
    if cfg.data.source.startswith("folder:"):
        for name in ("airplane", "bird"):
            (tmp_path / name).mkdir()
        cfg.data.source = f"folder:{tmp_path}"
    trace = trace_step(cfg)
    cost = roofline(trace, RTX4070)
    assert {"forward", "backward", "optimizer"} <= set(cost.phases)
    assert cost.step.flops > 0 and cost.step.bytes > 0 and cost.step.floor_s > 0
    memory = replay(trace, cuda=True)
    assert memory.peak_reserved >= memory.peak_allocated > memory.breakdown["parameters"] > 0


def test_an_image_folder_is_planned_without_reading_an_image(tmp_path):
    """The plan's stand-in replaces the folder source whatever data.loader picks (DALI included)."""
    for name in ("bricks", "grass"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "not-an-image.png").write_bytes(b"garbage")
    for loader in ("torch", "dali"):
        cfg = load_config(CONFIGS / "ddpm_textures.toml", [f"--data.source=folder:{tmp_path / 'data'}",
                                                          f"--data.loader={loader}", "--train.batch_size=2",
                                                          "--sample.every=0", f"--run.dir={tmp_path / 'run'}"])
        assert trace_step(cfg).ops


def test_every_method_has_a_recipe():
    methods = {load_config(p).method.name for p in CONFIGS.glob("*.toml")}
    assert set(METHODS) <= methods


def test_sample_grid_is_traced_with_its_phase(latents, tmp_path):
    trace = trace_step(tiny_lgt(latents, tmp_path / "run", "--train.batch_size=2"))
    memory = replay(trace, cuda=True)
    assert "sample grid" in memory.phase_peaks
    assert trace.grid_images == 2 * (1 + 3)  # 2 contents (sample.num), each with itself and its 3 styles
    assert roofline(trace, RTX4070).grid.flops > 0


def test_a_config_over_budget_gets_levers_that_bring_it_under(latents, tmp_path):
    cfg = tiny_lgt(latents, tmp_path / "run", "--train.batch_size=16", "--ode.checkpoint=false",
                   "--train.precision=fp32", "--sample.every=0")
    roomy = make_plan(cfg, RTX4070)
    assert roomy.configured.fits and roomy.largest_batch > cfg.train.batch_size and not roomy.levers
    needed = roomy.configured.memory.peak_allocated
    # Less than the live tensors need at their peak, whatever the allocator frees: 1 GiB of headroom
    # cannot be had either.
    plan = make_plan(cfg, RTX4070, budget=needed + UNTRACED - 2**20)
    assert not plan.configured.fits and plan.largest_batch is None
    names = [lever.name for lever in plan.levers]
    assert names == ["gradient checkpointing", "bf16 autocast"]
    assert all(lever.plan.memory.peak_allocated < needed for lever in plan.levers)
    assert any(lever.plan.fits for lever in plan.levers)


def test_budget_sizes_parse():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("7.5GB") == 7_500_000_000
    assert parse_bytes("512MiB") == 2**29 and parse_bytes("8g") == 8 * 2**30
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("eight")


def test_engine_plan_prints_json(latents, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_lgt(latents, tmp_path / "run", "--train.batch_size=2", "--sample.every=0").to_toml())
    assert plan_command.main([str(config), "--json", "--gpu=h100", "--batch-sizes=3", "--budget=8GiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"]["name"] == "h100" and report["fits"] is True and report["budget"] == 8 * 2**30
    assert [b["batch_size"] for b in report["batches"]] == [2, 3]
    batch = report["batches"][0]
    assert batch["memory"]["peak_reserved"] >= batch["memory"]["peak_allocated"] > 0
    assert math.isclose(batch["step"]["flops_per_sample"] * 2, batch["step"]["flops"])
    assert report["largest_batch_with_headroom"] > 3
    assert not (tmp_path / "run").exists()  # nothing is written, nothing prepared


def test_engine_train_plan_prints_the_table_and_trains_nothing(latents, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_lgt(latents, tmp_path / "run", "--train.batch_size=2").to_toml())
    assert train_command.main([str(config), "--plan", "--sample.every=0"]) == 0
    table = capsys.readouterr().out
    assert "batch 2" in table and "floor on rtx4070-laptop" in table and "largest batch with 1.00 GiB free" in table
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [(["--batch-sizes=0"], "batch sizes must be >= 1"),
                                           (["--budget=lots"], "8GiB"), (["--gpu=tpu"], "invalid choice")])
def test_engine_plan_usage_errors_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_command.main([str(tmp_path / "missing.toml"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_engine_plan_names_a_missing_config(tmp_path, capsys):
    assert plan_command.main([str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_kernels_dispatch_is_restored_after_a_plan(latents, tmp_path):
    x = torch.randn(1, 4, 4, 4)
    before = kernels._dispatch.backend_for_device("auto", x.device)  # csrc, or torch without the library
    trace_step(tiny_lgt(latents, tmp_path / "run", "--train.batch_size=2", "--sample.every=0"))
    assert kernels._dispatch.backend_for_device("auto", x.device) == before
    assert torch.nn.functional.scaled_dot_product_attention.__module__ == "torch._C._nn"
