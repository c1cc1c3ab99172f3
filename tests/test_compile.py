"""train.compile: the DDPM and LGT losses trace into one graph each (zero graph breaks) and give the
eager loss; a compiled run trains like an eager one. Compiled with the aot_eager backend here (the
graph capture and autograd are what is tested; inductor's C++ code generation would take minutes
on a CI machine)."""

import pytest
import torch
from test_graphs import lgt_config
from test_train import losses, tiny_config

import engine.train as train_module
from engine.train import train


def built(cfg):
    session = train_module.setup(cfg, train_module.World())
    return session.state.method, next(session.batches)


def test_ddpm_and_lgt_losses_compile_without_graph_breaks_and_match_eager(tmp_path):
    for cfg in (tiny_config(tmp_path / "ddpm"), lgt_config(tmp_path)):
        method, batch = built(cfg)
        method.train()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(method)(batch)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1
        compiled = torch.compile(method, backend="aot_eager", fullgraph=True)
        torch.manual_seed(3)
        eager = method(batch).loss
        torch.manual_seed(3)
        again = compiled(batch).loss
        torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)
        again.backward()
        assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def test_a_compiled_run_trains_like_an_eager_one(tmp_path, monkeypatch):
    real_compile = torch.compile
    modes = []

    def aot_eager(model, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    extra = ("--train.steps=3", "--sample.every=3", "--sample.num=2")
    train(tiny_config(tmp_path / "eager", *extra))
    train(tiny_config(tmp_path / "compiled", *extra, "--train.compile=max-autotune"))
    # The loss and the EMA copy's network (sample grids), both with the configured mode.
    assert modes == ["max-autotune", "max-autotune"]
    for step, loss in losses(tmp_path / "eager").items():
        assert abs(losses(tmp_path / "compiled")[step] - loss) < 1e-5
    assert (tmp_path / "compiled" / "samples" / "step-0000003.png").exists()


def test_a_loss_known_to_crash_the_cpu_compiler_trains_eagerly_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled a loss known to crash"))
    result = train(lgt_config(tmp_path, "--train.steps=1", "--train.compile=true"))
    assert result.step == 1
    assert "train.compile = True: eager steps, because torch 2.13's CPU inductor crashes" in capsys.readouterr().out
