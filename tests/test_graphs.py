"""The captured training step, checked on CPU: what decides capture, a step body with no host
synchronisation, the same result as an eager step, the device-side non-finite guard, and the
eager fallback. (Capture and replay themselves need a GPU.)"""

import importlib
import json

import pytest
import torch
from test_lgt import CONFIG, TINY_ENERGY, TINY_MODEL, write_synthetic_latents
from test_train import losses, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import engine.train as train_module
from engine.checkpoint import latest_checkpoint
from engine.config import load_config
from engine.data.base import Batch
from engine.graphs import StepGraph, capture_problem, graph_step
from engine.methods import method_class
from engine.train import NonFiniteLossError, train

CUDA = torch.device("cuda", 0)


class HostSyncDetector(TorchDispatchMode):
    """Fails on every op that reads a tensor's value back to the host: what .item(), bool(tensor),
    .tolist() and data-dependent Python branches dispatch to, each a CPU-GPU sync on CUDA."""

    READS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            raise AssertionError(f"host sync inside the captured step: {func._schema.name}")
        return func(*args, **(kwargs or {}))


def test_the_detector_catches_a_host_read():
    with pytest.raises(AssertionError, match="host sync"), HostSyncDetector():
        torch.ones(2).sum().item()


def lgt_config(tmp_path, *extra):
    path = write_synthetic_latents(tmp_path / "latents.safetensors", [6, 6, 6], 0)
    return load_config(CONFIG, [f"--data.source=latents:{path}", f"--run.dir={tmp_path / 'run'}",
                                "--train.device=cpu", "--train.batch_size=4", "--lgt.holdout_per_style=0",
                                *TINY_MODEL, *TINY_ENERGY, "--sample.every=0", "--log.every=1",
                                "--log.tensorboard=false", "--eval.at_end=false", *extra])


def test_what_can_be_captured(tmp_path):
    lgt = method_class("lgt")
    assert capture_problem(load_config(CONFIG), lgt, CUDA, 1) is None  # the 8 GB recipe is capturable
    assert "CUDA device" in capture_problem(load_config(CONFIG), lgt, torch.device("cpu"), 1)
    assert "DDP" in capture_problem(load_config(CONFIG), lgt, CUDA, 2)
    for override, reason in [("--train.grad_accum=2", "grad_accum"), ("--train.precision=fp16", "fp16"),
                             ("--model.checkpoint=true", "model.checkpoint"), ("--lgt.w_div=0.1", "w_div"),
                             ("--model.dropout=0.1", "dropout")]:
        assert reason in capture_problem(load_config(CONFIG, [override]), lgt, CUDA, 1), override
    # Without solver checkpointing nothing is recomputed: random draws inside a step are fine.
    assert capture_problem(load_config(CONFIG, ["--ode.checkpoint=false", "--lgt.w_div=0.1"]), lgt, CUDA, 1) is None


@pytest.mark.parametrize("method", ["ddpm", "lgt"])
def test_the_step_body_never_reads_a_value_back_to_the_host(tmp_path, method, monkeypatch):
    # On CPU tensors ssm_loss checks its positions with a host read (free there); on CUDA it uses a
    # device-side assertion: take that branch here, as a CUDA step would.
    ssm_module = importlib.import_module("kernels.ssm_loss")
    check = ssm_module._check_index_range
    monkeypatch.setattr(ssm_module, "_check_index_range", lambda i, n, v, on_host: check(i, n, v, False))
    cfg = lgt_config(tmp_path) if method == "lgt" else tiny_config(tmp_path / "run")
    session = train_module.setup(cfg, train_module.World())
    params, optimizer = session.params, session.state.optimizer
    batch = next(session.batches)
    skip = torch.zeros(())
    with HostSyncDetector():
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            terms, grad_norm, found_inf = graph_step(session.model, params, optimizer, batch, 1.0, torch.float32,
                                                     skip)
    assert found_inf.item() == 0 and torch.isfinite(terms["loss"]) and grad_norm > 0


class EagerStepGraph(StepGraph):
    """StepGraph's replay contract without CUDA: each replay runs the same step body eagerly."""

    def __init__(self, model, params, optimizer, example, grad_clip, dtype):
        self.run = lambda batch: graph_step(model, params, optimizer, batch, grad_clip, dtype, torch.zeros(()))
        self.optimizer = optimizer
        self.skipped = torch.zeros(())

    def replay(self, batch):
        self.optimizer.zero_grad(set_to_none=True)  # a captured backward writes its gradients afresh
        terms, grad_norm, found_inf = self.run(batch)
        self.skipped += found_inf
        return terms, grad_norm, found_inf


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(train_module, "capture_problem", lambda *args: None)
    monkeypatch.setattr(train_module, "StepGraph", EagerStepGraph)


def test_captured_steps_train_exactly_as_eager_steps(tmp_path, graphs_on_cpu):
    extra = ("--train.steps=5", "--sample.every=0", "--train.ema_decay=0.9")
    train(tiny_config(tmp_path / "eager", *extra))
    train(tiny_config(tmp_path / "graph", *extra, "--train.cuda_graphs=true"))
    assert losses(tmp_path / "graph") == losses(tmp_path / "eager")
    for ema in (False, True):
        a = latest_checkpoint(tmp_path / "eager" / "checkpoints").model_state(ema=ema)
        b = latest_checkpoint(tmp_path / "graph" / "checkpoints").model_state(ema=ema)
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    eager_rows = [json.loads(line) for line in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [r["lr"] for r in eager_rows]  # the lr tensors follow the schedule


def test_a_non_finite_captured_step_is_skipped_on_the_device_and_stops_at_the_next_check(
        tmp_path, graphs_on_cpu, monkeypatch):
    method_cls = train_module.method_class("ddpm")
    real_forward = method_cls.forward
    seen = {}

    def forward(self, batch):
        out = real_forward(self, batch)
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 3:  # step 3
            seen["weights"] = {k: v.clone() for k, v in self.state_dict().items()}
            out.loss = out.loss * float("nan")
        if seen["calls"] == 4:  # step 4 starts from the weights step 3 left: untouched
            seen["after"] = {k: v.clone() for k, v in self.state_dict().items()}
        return out

    monkeypatch.setattr(method_cls, "forward", forward)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"1 step\(s\) between step 3 and step 4") as err:
        train(tiny_config(run, "--train.steps=8", "--log.every=4", "--checkpoint.every=2", "--sample.every=0",
                          "--train.cuda_graphs=true"))
    assert all(torch.equal(seen["after"][k], seen["weights"][k]) for k in seen["weights"])
    assert latest_checkpoint(run / "checkpoints").step == 2 and "step-2" in str(err.value)


def test_a_run_that_cannot_be_captured_trains_eagerly_and_says_why_once(tmp_path, capsys):
    result = train(tiny_config(tmp_path / "run", "--train.steps=2", "--sample.every=0", "--train.cuda_graphs=auto"))
    assert result.step == 2
    out = capsys.readouterr().out
    assert out.count("train.cuda_graphs = 'auto': eager steps, because CUDA graphs need a CUDA device") == 1


def test_captured_step_inputs_are_copied_into_static_buffers():
    """replay() writes each batch into the buffers the graph reads, never rebinding them."""
    graph = StepGraph.__new__(StepGraph)
    graph.static = Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    buffers = (graph.static.x.data_ptr(), graph.static.labels.data_ptr())
    graph.graph = type("Graph", (), {"replay": lambda self: None})()
    graph.terms, graph.grad_norm, graph.found_inf = {}, torch.zeros(()), torch.zeros(())
    graph.skipped = torch.zeros(())
    graph.replay(Batch(torch.ones(2, 3), torch.tensor([4, 5])))
    assert (graph.static.x.data_ptr(), graph.static.labels.data_ptr()) == buffers
    assert graph.static.x.eq(1).all() and graph.static.labels.tolist() == [4, 5]
