"""Config sections that more than one method reads.

[model]        the U-Net (DDPM's denoiser, LGT's velocity field)
[text]         text conditioning of the generative U-Nets (ddpm, fm, fmm): prompts, their encoder
[autoencoder]  the autoencoder: what method "autoencoder" trains, and what a method that trains
               on latents of built-in images trains first to make them
[prepare]      how built-in images become latents for a method that trains on latents
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.options import option


@dataclass
class ModelConfig:
    channels: int = option(64, "base width of the U-Net")
    channel_mult: list[int] = option([1, 2, 2], "width multiplier per resolution level")
    num_res_blocks: int = option(2, "ResBlocks per level")
    attention_resolutions: list[int] = option([8], "feature-map sides (e.g. 16, 8) that get self-attention")
    num_heads: int = option(4, "attention heads")
    num_groups: int = option(32, "GroupNorm groups (clamped to divide the channel count)")
    dropout: float = option(0.0, "dropout inside ResBlocks")
    checkpoint: bool = option(False, "gradient checkpointing per U-Net block (less memory, more compute)")

    def validate(self, check):
        check(self.channels > 0, "channels", "must be > 0")
        check(len(self.channel_mult) > 0 and all(m > 0 for m in self.channel_mult), "channel_mult",
              "must be a non-empty list of positive ints")
        check(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        check(self.num_heads >= 1, "num_heads", "must be >= 1")
        check(self.num_groups >= 1, "num_groups", "must be >= 1")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class TextConfig:
    encoder: str = option("", "text conditioning: '' = none (a learned row per class); 'wordllama' (the pip package "
                          "wordllama's bundled weights: pip install -e '.[text]') or 'clip:DIR' (a local CLIP text "
                          "model) embeds one prompt per class, which the U-Net reads through cross-attention")
    template: str = option("a photo of {}", "each class's prompt; {} = the class name (underscores read as spaces)")
    prompts: list[str] = option([], "one prompt per class, in class order (instead of template)")
    table: str = option("", "a prompt table from engine-embed-text (instead of encoder, template and prompts)")

    @property
    def enabled(self) -> bool:
        return bool(self.encoder or self.table)

    def validate(self, check):
        check(self.encoder in ("", "wordllama") or (self.encoder.startswith("clip:") and len(self.encoder) > 5),
              "encoder", "must be '', 'wordllama' or 'clip:DIR'")
        check("{}" in self.template, "template", "needs {} where the class name goes, e.g. 'a photo of {}'")


def check_text_config(cfg, check) -> None:
    """Text conditioning is read through cross-attention, which sits at model.attention_resolutions."""
    if cfg.text.enabled:
        check(bool(cfg.model.attention_resolutions), "model.attention_resolutions",
              "is empty, but [text] conditioning is read through cross-attention, which sits where self-attention "
              "does: list at least one feature-map side")


def prompt_table_for(text: TextConfig | None, data):
    """The prompt table (engine.text.PromptTable) a text-conditioned network is built from, or None.

    Made before the network, so the network's context width comes from it: read from text.table, or
    embedded now by text.encoder (one prompt per class of `data`, then ""). Opened from a checkpoint
    (`data` a DataInfo recording the table), a table of the recorded shape whose values the
    checkpoint's weights then fill: no encoder is needed to sample from a trained run."""
    from engine import text as text_module  # the text encoders' imports only where text is used

    if text is None or not text.enabled:
        return None
    recorded = getattr(data, "text", None)
    if recorded is not None:
        n, length, dim = recorded["shape"]
        return text_module.PromptTable(torch.zeros(n, length, dim), torch.ones(n, length, dtype=torch.bool),
                                       list(recorded["prompts"]), recorded["encoder"], list(data.class_names))
    if text.table:
        table = text_module.read_prompt_table(text.table)
        if table.class_names != list(data.class_names):
            raise ValueError(f"prompt table {text.table} was made for the classes {table.class_names}, but the data "
                             f"has {list(data.class_names)}; make it again with engine-embed-text --classes "
                             f"{','.join(data.class_names)}")
        return table
    encoder = text_module.load_text_encoder(text.encoder)
    return text_module.build_prompt_table(list(data.class_names), encoder, text.template, text.prompts or None)


@contextlib.contextmanager
def typed_prompts(method: torch.nn.Module, prompts: list[str]) -> Iterator[None]:
    """Inside the block, labels 0..len(prompts)-1 of `method`'s text-conditioned network read `prompts`
    (new text, e.g. engine-sample --prompt), embedded by the encoder its table was made with (loaded
    again and checked to be the same weights); the null row stays the "" prompt."""
    from engine import text as text_module
    from engine.models.unet import prompt_context_of

    table = prompt_context_of(method)
    if table is None:
        raise ValueError("this run was trained without text conditioning ([text] encoder = ''): it takes class "
                         "labels (--labels), not prompts")
    if not all(prompt.strip() for prompt in prompts):
        raise ValueError('--prompt "" is the unconditional row: sample it with --cfg 0, or give a prompt with words')
    if len(prompts) > table.null_label:
        raise ValueError(f"{len(prompts)} prompts at once, but this model's table has {table.null_label} prompt "
                         f"rows to stand in for; sample at most {table.null_label} prompts per call")
    context, mask = text_module.load_table_encoder(table).encode(prompts)
    with table.substituted(context.to(table.context.device), mask.to(table.mask.device)):
        yield


def class_conditional_network(network_cls, model: ModelConfig, data, text: TextConfig | None = None):
    """(`network_cls.from_config(model, ...)` for data's samples, the number of classes): as many
    channels out as in, one class per class name (the network adds the null class), image_size the
    samples' height, and with [text] conditioning on, the prompt table (`prompt_table_for`). The
    denoiser of ddpm, the velocity fields of fm, fmm and lgt."""
    channels, height, _ = data.sample_shape
    num_classes = len(data.class_names)
    network = network_cls.from_config(model, in_channels=channels, out_channels=channels, num_classes=num_classes,
                                      image_size=height, prompt_table=prompt_table_for(text, data))
    return network, num_classes


@dataclass
class AutoencoderConfig:
    kind: str = option("kl", "KL autoencoder (f=8) or the linear 784->128->784 one", ("kl", "linear"))
    latent_channels: int = option(4, "latent channels of the KL autoencoder")
    channels: int = option(64, "base width of the KL autoencoder")
    channel_mult: list[int] = option([1, 2, 4, 4], "width multiplier per level; len - 1 = log2 of the downsampling")
    num_res_blocks: int = option(1, "ResBlocks per level")
    latent_dim: int = option(128, "latent size of the linear autoencoder")
    kl_weight: float = option(1e-6, "weight of the KL term")
    loss: str = option("l1", "reconstruction loss", ("l1", "mse"))
    num_groups: int = option(32, "GroupNorm groups of the KL autoencoder (clamped to divide the channel count)")

    @property
    def downsampling(self) -> int:
        """Image side / latent side of the KL autoencoder."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self, check):
        check(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        check(self.channels >= 1, "channels", "must be >= 1")
        check(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), "channel_mult",
              "must be a non-empty list of positive ints")
        check(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        check(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        check(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        check(self.num_groups >= 1, "num_groups", "must be >= 1")


@dataclass
class PrepareConfig:
    crops: int = option(2048, "built-in latents: crops drawn from builtin:textures and encoded")
    image_size: int = option(256, "built-in latents: side of the encoded crops (latent side = this / 8)")
    autoencoder_steps: int = option(500, "built-in latents: training steps of the built-in autoencoder "
                                    "(when data.autoencoder is '')")
    autoencoder_image_size: int = option(64, "built-in latents: crop side the built-in autoencoder trains on "
                                         "(it is convolutional: it then encodes prepare.image_size crops)")
    autoencoder_batch_size: int = option(8, "built-in latents: batch size of the built-in autoencoder's training")

    def validate(self, check):
        check(self.crops >= 1, "crops", "must be >= 1")
        check(self.autoencoder_steps >= 1, "autoencoder_steps", "must be >= 1")
        check(self.autoencoder_batch_size >= 1, "autoencoder_batch_size", "must be >= 1")


def check_prepare_sizes(cfg, check) -> None:
    """The crop sides [prepare] asks for must be multiples of the [autoencoder]'s downsampling."""
    if cfg.autoencoder.kind != "kl":
        return
    factor = cfg.autoencoder.downsampling
    for key in ("image_size", "autoencoder_image_size"):
        size = getattr(cfg.prepare, key)
        check(size >= factor and size % factor == 0, f"prepare.{key}",
              f"must be a positive multiple of the autoencoder's downsampling factor {factor} "
              f"(2^(len(autoencoder.channel_mult) - 1))")
