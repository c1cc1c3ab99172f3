"""The run's stage line (engine/stages.py): said once per stage, in order, with what is done and what
is next; silent outside engine-train and inside another stage; the stages engine-train plans."""

import pytest

from engine.commands.train import planned_stages
from engine.config import load_config
from engine.stages import run_stages, skipped, stage


def test_each_stage_is_said_once_with_what_is_done_and_next(capsys):
    with run_stages(["autoencoder", "encoding", "training", "evaluation"]):
        skipped("autoencoder", "cached")
        with stage("encoding", "768 crops"), stage("training", "nested: part of encoding"), stage("evaluation"):
            pass
        with stage("training", "steps 0 -> 600"):
            pass
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert len(lines) == 2
    assert lines[0].startswith("run 2/4 encoding (768 crops) | done: autoencoder cached | "
                               "next: training, evaluation | ")
    assert lines[1].startswith("run 3/4 training (steps 0 -> 600) | done: autoencoder cached, encoding 0s | "
                               "next: evaluation | ")


def test_stages_say_nothing_outside_engine_train(capsys):
    with stage("training", "steps 0 -> 5"):
        pass
    skipped("encoding", "cached")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("overrides, expected", [
    (["--method.name=lgt"], ["autoencoder", "encoding", "training", "evaluation"]),
    (["--method.name=lgt", "--data.autoencoder=runs/ae"], ["encoding", "training", "evaluation"]),
    (["--method.name=ddpm", "--ddpm.latent=true"], ["autoencoder", "encoding", "training", "evaluation"]),
    (["--method.name=ddpm"], ["training", "evaluation"]),
    (["--method.name=ddpm", "--eval.at_end=false"], ["training"]),
])
def test_planned_stages_follow_the_config(overrides, expected):
    assert planned_stages(load_config(None, overrides)) == expected
