"""engine-profile: a trace with the engine's phase names, a phase table, the nsys command, and the
real run directory left alone. NVTX phases never raise on a CPU-only torch."""

import json

from test_graphs import lgt_config
from test_train import tiny_config

from engine.commands.profile import main
from engine.profiling import phase


def test_phases_are_harmless_without_a_profiler_or_a_gpu():
    with phase("forward"), phase("forward"):
        pass


def test_profile_writes_a_trace_with_the_phases_and_leaves_the_run_alone(tmp_path, capsys):
    run = tmp_path / "real-run"
    config = tmp_path / "lgt.toml"
    config.write_text(lgt_config(tmp_path).to_toml())
    out = tmp_path / "profile"
    assert main([str(config), "--steps", "2", "--warmup", "1", "--out", str(out), f"--run.dir={run}"]) == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    for expected in ("data", "forward", "backward", "optimizer", "transport", "style energy", "content energy",
                     "ode step 1/2", "ode step 2/2"):
        assert expected in names, expected
    printed = capsys.readouterr().out
    assert "phase" in printed and "backward" in printed and "samples/s" in printed
    assert "nsys profile --capture-range=cudaProfilerApi" in printed
    assert not run.exists()  # no checkpoint, config or metrics in the real run directory


def test_profile_of_a_ddpm_run_reports_the_same_phases(tmp_path, capsys):
    config = tmp_path / "ddpm.toml"
    config.write_text(tiny_config(tmp_path / "run").to_toml())
    assert main([str(config), "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "p")]) == 0
    assert "forward" in capsys.readouterr().out
