"""Backend dispatch (kernels/_dispatch.py): which implementation each `backend=` runs on which
device, the errors for backends that cannot run, and that every op follows the decision (auto never
enters the Triton code on CPU tensors, even under TRITON_INTERPRET=1; "triton" always does)."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _dispatch, _triton_group_norm, _triton_patch_swd, _triton_ssm_loss
from kernels._dispatch import backend_for_device, resolve_backend
from kernels.group_norm_film_silu import group_norm_film_silu_reference
from kernels.patch_swd import patch_swd_reference
from kernels.ssm_loss import ssm_loss_reference

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def not_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def without_triton(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)


@pytest.fixture(params=[True, False], ids=["csrc-loaded", "csrc-absent"])
def csrc_state(request, monkeypatch):
    """Both states of the csrc library, whatever this machine built: auto on CPU follows it."""
    monkeypatch.setattr(_dispatch._csrc, "loaded", lambda: request.param)
    return "csrc" if request.param else "torch"


def test_auto_on_cpu_tensors_is_csrc_or_torch_even_under_the_interpreter(interpreting, csrc_state):
    assert _dispatch.triton_interpreting()
    assert resolve_backend("auto", torch.zeros(2), None, torch.zeros(3, dtype=torch.long)) == csrc_state
    assert backend_for_device("auto", CPU) == csrc_state


def test_auto_on_cpu_tensors_is_csrc_or_torch_without_the_interpreter(not_interpreting, csrc_state):
    assert resolve_backend("auto", torch.zeros(2)) == csrc_state


def test_auto_backend_overrides_auto_only_inside_the_block():
    with kernels.auto_backend("torch"):
        assert backend_for_device("auto", CPU) == "torch"
        assert backend_for_device("auto", CUDA) == "torch"
        with pytest.raises(ValueError, match="backend='triton'"), kernels.auto_backend("triton"):
            backend_for_device("auto", torch.device("meta"))
    assert backend_for_device("auto", CUDA) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"), kernels.auto_backend("cuda"):
        pass


def test_auto_on_cuda_is_triton_and_falls_back_to_torch_without_triton(monkeypatch):
    assert backend_for_device("auto", CUDA) == "triton"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    assert backend_for_device("auto", CUDA) == "torch"


def test_auto_on_other_devices_is_torch(csrc_state):
    assert resolve_backend("auto", torch.zeros(2, device="meta")) == "torch"


def test_explicit_triton_on_cpu_tensors_under_the_interpreter(interpreting):
    assert resolve_backend("triton", torch.zeros(2)) == "triton"
    assert backend_for_device("triton", CUDA) == "triton"


def test_explicit_triton_on_cpu_tensors_without_the_interpreter_raises(not_interpreting):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(2))


def test_explicit_triton_on_a_device_triton_cannot_run_on_raises(interpreting):
    with pytest.raises(ValueError, match="needs CUDA tensors, got tensors on meta"):
        resolve_backend("triton", torch.zeros(2, device="meta"))


def test_explicit_triton_without_triton_installed_raises(interpreting, without_triton):
    for device in (CPU, CUDA):
        with pytest.raises(ValueError, match="triton is not installed; use backend='torch' or 'auto'"):
            backend_for_device("triton", device)


@pytest.mark.parametrize("device", [CPU, CUDA, torch.device("meta")], ids=str)
def test_torch_runs_anywhere(interpreting, device):
    assert backend_for_device("torch", device) == "torch"


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", "reference"])
def test_unknown_backend_raises(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(backend, torch.zeros(2))


@pytest.mark.parametrize("device", [CPU, CUDA], ids=str)
def test_csrc_raises_when_not_loaded_saying_why(device, monkeypatch):
    monkeypatch.setattr(_dispatch._csrc, "loaded", lambda: False)
    monkeypatch.setattr(_dispatch._csrc, "problem", lambda: "LGT_CSRC=0 is set")
    with pytest.raises(ValueError, match="backend='csrc': LGT_CSRC=0 is set"):
        backend_for_device("csrc", device)


def test_csrc_has_cpu_ops_only(monkeypatch):
    monkeypatch.setattr(_dispatch._csrc, "loaded", lambda: True)
    assert backend_for_device("csrc", CPU) == "csrc"
    with pytest.raises(ValueError, match="CPU ops only"):
        backend_for_device("csrc", CUDA)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_mixed_devices_raise(interpreting, backend):
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        resolve_backend(backend, torch.zeros(2), None, torch.zeros(2, device="meta"))


def test_mixed_devices_raise_through_an_op():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="one device"):
        kernels.group_norm_film_silu(x, 2, torch.ones(4), torch.zeros(4, device="meta"))


# ------------------------------------------------------------------ each op follows the decision


class EnteredTriton(Exception):
    """Raised by the stand-ins for the Triton entry points below."""


def _enter_triton(*args, **kwargs):
    raise EnteredTriton


class _RaisingFunction:
    apply = staticmethod(_enter_triton)


@pytest.fixture
def triton_entry_points_raise(monkeypatch):
    """Every way into the Triton code of the three ops raises EnteredTriton (the ops import these
    names from their `_triton_*` modules when they run, so the stand-ins are what they get)."""
    monkeypatch.setattr(_triton_group_norm, "launch_forward", _enter_triton)
    monkeypatch.setattr(_triton_patch_swd, "patch_swd_triton", _enter_triton)
    monkeypatch.setattr(_triton_ssm_loss, "GramDistanceTriton", _RaisingFunction)


def _op_calls():
    """(name, call(backend), reference value) for the three Triton-backed ops on small CPU inputs."""
    x = torch.randn(2, 4, 3, 5)
    y = torch.randn(2, 4, 3, 5)
    weight, bias = torch.randn(2, 4)
    theta = F.normalize(torch.randn(3, 36), dim=1)
    index = torch.randperm(15)[:6]
    return [
        ("group_norm_film_silu", lambda backend: kernels.group_norm_film_silu(x, 2, weight, bias, backend=backend),
         group_norm_film_silu_reference(x, 2, weight, bias)),
        ("patch_swd", lambda backend: kernels.patch_swd(x, y, theta, 3, backend=backend),
         patch_swd_reference(x, y, theta, 3)),
        ("ssm_loss", lambda backend: kernels.ssm_loss(x, y, index, backend=backend),
         ssm_loss_reference(x, y, index)),
    ]


def test_auto_ops_on_cpu_never_enter_triton_under_the_interpreter(seed, interpreting, triton_entry_points_raise):
    for name, call, expected in _op_calls():
        torch.testing.assert_close(call("auto"), expected, msg=name)


def test_triton_ops_on_cpu_enter_triton_under_the_interpreter(seed, interpreting, triton_entry_points_raise):
    for name, call, _ in _op_calls():
        with pytest.raises(EnteredTriton):
            call("triton")
            pytest.fail(f"{name}: backend='triton' did not run the Triton code")


def test_triton_ops_match_the_reference(seed, interpreting):
    """The same calls with the real entry points: the stand-ins above replace what really runs."""
    for name, call, expected in _op_calls():
        torch.testing.assert_close(call("triton"), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_ops_without_csrc_fall_to_torch_and_refuse_csrc(monkeypatch):
    monkeypatch.setattr(_dispatch._csrc, "loaded", lambda: True)
    assert resolve_backend("auto", torch.zeros(2), has_csrc=False) == "torch"
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="no csrc implementation"):
        kernels.ssm_loss(x, x, backend="csrc")
