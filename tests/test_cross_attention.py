"""Cross-attention and the prompt table inside the U-Net: masked attention against a float64
reference, the blocks' layout for the fused kernels, the table fixed at construction (the seed's
"table loaded after the model" bug cannot be written), and strict loads that name mismatched keys
(the seed's "cross-attention shapes skipped on resume" bug)."""

import importlib
from types import SimpleNamespace

import pytest
import torch

import kernels
from engine.checkpoint import CheckpointError, load_weights
from engine.models.unet import (
    CrossAttentionBlock,
    UNet,
    describe_text_conditioning,
    prompt_context_of,
    text_conditioning_record,
)

attention_module = importlib.import_module("kernels.attention")


def _table(n: int, length: int, dim: int, real: list[int] | None = None):
    """A prompt table of n rows; row i has real[i] tokens (default: all)."""
    context = torch.randn(n, length, dim)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, count in enumerate(real or [length] * n):
        mask[i, :count] = True
    context[~mask] = 0
    return SimpleNamespace(context=context, mask=mask, prompts=[f"p{i}" for i in range(n - 1)] + [""],
                           encoder="test@0")


def _unet(table=None, num_classes: int = 2, attention=(4,)) -> UNet:
    return UNet(in_channels=3, out_channels=3, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=list(attention), num_heads=2, num_groups=8, dropout=0.0,
                num_classes=num_classes, image_size=8, prompt_table=table)


def _randomise(module: torch.nn.Module) -> None:
    """Non-zero weights everywhere (the zero-initialised projections would hide the conditioning)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


# --------------------------------------------------------------------------- masked attention


def _masked_reference(q, k, v, mask):
    """float64 softmax over the kept keys only, row by row."""
    out = torch.empty_like(q, dtype=torch.float64)
    for b in range(q.shape[0]):
        keep = mask[b]
        qb, kb, vb = q[b].double(), k[b, :, keep].double(), v[b, :, keep].double()
        out[b] = torch.softmax(qb @ kb.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ vb
    return out


@pytest.mark.parametrize("unfused", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9), (3, 1, 11, 4, 8), (1, 2, 1, 8, 3)])
def test_masked_attention_matches_float64_reference(seed, unfused, shape):
    B, heads, Lq, d, Lk = shape
    q, k, v = (torch.randn(B, heads, L, d, requires_grad=True) for L in (Lq, Lk, Lk))
    mask = torch.rand(B, Lk) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # every row keeps a key and masks one
    grad_out = torch.randn(B, heads, Lq, d)
    with kernels.unfused_attention() if unfused else torch.enable_grad():
        out = kernels.attention(q, k, v, key_padding_mask=mask)
    expected = _masked_reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grads64 = torch.autograd.grad(_masked_reference(q64, k64, v64, mask), (q64, k64, v64), grad_out.double())
    for actual, reference in zip(grads, grads64):
        torch.testing.assert_close(actual.double(), reference, rtol=1e-5, atol=1e-5)
    assert not grads[1][~mask[:, None, :, None].expand_as(k)].any()  # masked keys get no gradient


def test_masked_attention_refuses_bad_masks_and_xformers():
    q = k = v = torch.randn(2, 1, 4, 8)
    for bad in (torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4), torch.ones(3, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="key_padding_mask"):
            kernels.attention(q, k, v, key_padding_mask=bad)
    with pytest.raises(ValueError, match="xformers"):
        kernels.attention(q, k, v, backend="xformers", key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_cross_attention_feeds_q_k_v_with_stride_1_along_d(monkeypatch):
    """The layout SDPA's fused kernels need, with the mask: torch's own choice is not the math kernel."""
    block = CrossAttentionBlock(channels=16, context_dim=12, num_heads=2, num_groups=8)
    seen = []

    def capture(q, k, v, key_padding_mask=None, **kwargs):
        seen.append((q, k, v, key_padding_mask))
        return attention_module.attention(q, k, v, key_padding_mask=key_padding_mask, **kwargs)

    monkeypatch.setattr(importlib.import_module("engine.models.attention").kernels, "attention", capture)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False
    block(torch.randn(2, 16, 4, 4), torch.randn(2, 8, 12), mask)
    q, k, v, passed = seen[0]
    assert q.shape == (2, 2, 16, 8) and k.shape == v.shape == (2, 2, 8, 8) and passed is mask
    for t in (q, k, v):
        assert t.stride(-1) == 1 and t.transpose(1, 2).stride(-1) == 1
    bias = attention_module._padding_bias(mask, q.dtype)
    assert torch.ops.aten._fused_sdp_choice(q, k, v, bias) != torch.nn.attention.SDPBackend.MATH.value


def test_padded_tokens_do_not_change_the_output(seed):
    table = _table(3, 8, 12, real=[3, 5, 1])
    unet = _unet(table)
    _randomise(unet)
    x, t, labels = torch.randn(3, 3, 8, 8), torch.rand(3) * 1000, torch.tensor([0, 1, 2])
    before = unet(x, t, labels)
    with torch.no_grad():
        unet.prompts.context[~unet.prompts.mask] = 100.0  # only padding changes
    torch.testing.assert_close(unet(x, t, labels), before)


# --------------------------------------------------------------------------- the table in the network


def test_text_unet_is_built_from_the_table(seed):
    table = _table(3, 8, 12)
    unet = _unet(table)
    assert unet.context_dim == 12 and unet.num_classes == 2 and unet.null_label == 2
    assert unet.class_embedding is None  # conditioning goes through cross-attention only
    attention_blocks = sum(type(m).__name__ == "AttentionBlock" for m in unet.modules())
    cross_attention_blocks = sum(isinstance(m, CrossAttentionBlock) for m in unet.modules())
    assert cross_attention_blocks == attention_blocks == 4  # after every self-attention block
    assert "4 cross-attention blocks" in describe_text_conditioning(unet)
    assert text_conditioning_record(unet) == {"shape": [3, 8, 12], "prompts": ["p0", "p1", ""],
                                              "encoder": "test@0"}
    torch.testing.assert_close(unet.state_dict()["prompts.context"], table.context)
    _randomise(unet)
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0)
    out = unet(x, t, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], unet(x, t, torch.tensor([1, 1]))[0])  # the row's prompt matters
    torch.testing.assert_close(unet(x, t, None), unet(x, t, torch.tensor([2, 2])))  # None = the "" row


def test_class_unet_has_no_prompt_table_to_attach_later():
    """The seed bug (table loaded after the model: no cross-attention existed) cannot be written: a
    network is built with its table or without one, and the one without has nothing to attach to."""
    unet = _unet()
    assert unet.prompts is None and unet.context_dim is None
    assert not any(isinstance(m, CrossAttentionBlock) for m in unet.modules())
    assert prompt_context_of(unet) is None and describe_text_conditioning(unet) is None
    assert not any(hasattr(unet, name) for name in ("set_prompt_table", "attach_prompts", "load_prompts"))


def test_text_unet_refuses_a_table_that_does_not_fit():
    with pytest.raises(ValueError, match="one row per class"):
        _unet(_table(4, 8, 12), num_classes=2)
    with pytest.raises(ValueError, match="attention_resolutions"):
        _unet(_table(3, 8, 12), attention=())


def test_substituted_rows_are_read_and_the_table_restored(seed):
    unet = _unet(_table(3, 8, 12))
    _randomise(unet)
    saved = unet.prompts.context.clone()
    new_context, new_mask = torch.randn(1, 16, 12), torch.ones(1, 16, dtype=torch.bool)
    x, t = torch.randn(1, 3, 8, 8), torch.full((1,), 300.0)
    with unet.prompts.substituted(new_context, new_mask):
        assert unet.prompts.context.shape == (3, 16, 12)
        torch.testing.assert_close(unet.prompts.context[0], new_context[0])
        assert not unet.prompts.mask[1, 8:].any()  # the other rows keep their tokens, padded
        substituted = unet(x, t, torch.tensor([0]))
    torch.testing.assert_close(unet.prompts.context, saved)
    assert not torch.allclose(substituted, unet(x, t, torch.tensor([0])))
    with pytest.raises(ValueError, match="width"), unet.prompts.substituted(torch.randn(1, 8, 5),
                                                                          torch.ones(1, 8, dtype=torch.bool)):
        pass


# --------------------------------------------------------------------------- strict loads


def test_loading_text_weights_into_a_class_model_names_the_keys():
    text_state = _unet(_table(3, 8, 12)).state_dict()
    with pytest.raises(CheckpointError) as raised:
        load_weights(_unet(), text_state, "run/checkpoints/step-5/model.safetensors")
    message = str(raised.value)
    assert "step-5" in message and "prompts.*" in message and "middle_block.2.*" in message
    assert "missing from the file: class_embedding.* (1)" in message


def test_a_table_of_another_width_is_an_error_naming_the_mismatched_shapes():
    """The seed's resume bug: cross-attention shapes that differ were skipped; here they are an error."""
    saved = _unet(_table(3, 8, 12)).state_dict()
    model = _unet(_table(3, 8, 20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shapes differ: .*to_kv\.weight \[\d+, 12\] saved, \[\d+, 20\]"):
        load_weights(model, saved, "ckpt")
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key])
