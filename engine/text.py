"""Text conditioning made offline: a text encoder and the prompt-embedding table a model reads.

Encoders (`load_text_encoder(spec)`), both read from local files only, nothing is ever downloaded:
    "wordllama"   the static token embeddings [32000, 256] and the tokenizer that the PyPI package
                  wordllama ships inside its wheel (pip install -e '.[text]'); read as two files,
                  the package itself is never imported
    "clip:DIR"    a local CLIP text model directory (transformers' CLIPTokenizer + CLIPTextModel)

`encode(prompts)` gives token-level context [n, L, D] fp32 and a key-padding mask [n, L] bool. L is
the longest prompt's token count rounded up to a multiple of 8, so masks stay aligned for fused
attention kernels; padded positions are False with zero context. Every prompt, "" included, has
at least one token (the tokenizer's BOS).

Table file format (safetensors), one row per class and a last "" row for the unconditional /
classifier-free-guidance case:
    context  [N, L, D] fp32, finite
    mask     [N, L] bool, every row with at least one True
    metadata format, prompts (JSON list of N, the last ""), class_names (JSON list of N - 1),
             encoder (the identity of the encoder that made it: name and a hash of its weights)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.safe_files import read_tensor_file, replacing

TABLE_FORMAT = "engine-prompts/1"
DEFAULT_TEMPLATE = "a photo of {}"
RERUN_HINT = "re-run engine-embed-text to write it again"
ENCODER_SPECS = "'wordllama' or 'clip:DIR' (a local CLIP text model directory)"
WORDLLAMA_INSTALL = "pip install -e '.[text]' (or pip install wordllama==0.4.0.post1)"
WORDLLAMA_WEIGHTS = "weights/l2_supercat_256.safetensors"
WORDLLAMA_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
WORDLLAMA_MAX_TOKENS = 64
LENGTH_MULTIPLE = 8


# --------------------------------------------------------------------------- encoders


class TextEncoder:
    """Prompts -> token-level context. A subclass sets `identity` (name@hash of its weights), `dim`,
    `max_tokens` and `keeps_last_token` (truncation keeps the final token, e.g. CLIP's EOS), and
    implements `tokenize` and `embed`; `encode` does the rest the same way for all."""

    identity: str
    dim: int
    max_tokens: int
    keeps_last_token: bool = False

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, special tokens included, not truncated."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [n, l] long, mask [n, l] bool -> context [n, l, D] (any float dtype)."""
        raise NotImplementedError

    @torch.no_grad()  # not inference_mode: a model trained on the table saves its context for backward
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context [n, L, D] float32, mask [n, L] bool), L a multiple of 8 (module doc)."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        ids = [self._truncate(prompt, row) for prompt, row in zip(prompts, self.tokenize(prompts))]
        empty = [prompt for prompt, row in zip(prompts, ids) if not row]
        if empty:
            raise ValueError(f"text encoder {self.identity} gave no token for prompt(s) {empty}: its tokenizer "
                             f"adds no BOS token, so these rows could not be attended to")
        longest = max(len(row) for row in ids)
        ids_tensor = torch.zeros(len(ids), longest, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool)
        for i, row in enumerate(ids):
            ids_tensor[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        context = self.embed(ids_tensor, mask).float() * mask[..., None]
        length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
        padding = length - longest
        return F.pad(context, (0, 0, 0, padding)).contiguous(), F.pad(mask, (0, padding))

    def _truncate(self, prompt: str, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        warnings.warn(f"prompt {prompt!r} has {len(ids)} tokens; {self.identity} reads at most "
                      f"{self.max_tokens}, so it is truncated", stacklevel=2)
        return ids[:self.max_tokens - 1] + ids[-1:] if self.keeps_last_token else ids[:self.max_tokens]


class WordLlamaEncoder(TextEncoder):
    """wordllama's static token embeddings (l2_supercat, D = 256): context = the embedding rows of
    the prompt's token ids. No network, no model: a table lookup."""

    max_tokens = WORDLLAMA_MAX_TOKENS

    def __init__(self, package_dir: Path):
        weights, tokenizer = package_dir / WORDLLAMA_WEIGHTS, package_dir / WORDLLAMA_TOKENIZER
        for path in (weights, tokenizer):
            if not path.is_file():
                raise FileNotFoundError(f"wordllama text encoder: {path} is missing; the installed wordllama is "
                                        f"not the expected version: {WORDLLAMA_INSTALL}")
        from tokenizers import Tokenizer  # a dependency of wordllama

        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.table = load_file(weights)["embedding.weight"]  # [32000, 256] fp16
        self.dim = self.table.shape[1]
        self.identity = f"wordllama:{weights.stem}@{file_hash([weights])}"

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(prompts)]

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class ClipTextEncoder(TextEncoder):
    """A local CLIP text model: context = last_hidden_state, mask = attention_mask."""

    keeps_last_token = True  # EOS

    def __init__(self, directory: Path):
        if not directory.is_dir():
            raise FileNotFoundError(f"CLIP text encoder: {directory} is not an existing local directory; only "
                                    f"local directories are loaded (nothing is downloaded): pass the folder "
                                    f"holding the CLIPTextModel's config.json, weights and tokenizer files")
        weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not weights:
            raise ValueError(f"CLIP text encoder: {directory} holds no weights (model.safetensors or "
                             f"pytorch_model.bin)")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError(f"the CLIP text encoder in {directory} needs the optional package transformers "
                              f"(pip install transformers); it is not installed") from err
        self.tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(directory, local_files_only=True).float().eval()
        self.model.requires_grad_(False)
        config = self.model.config
        self.dim = config.hidden_size
        self.max_tokens = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.identity = f"clip:{directory}@{file_hash(weights)}"

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        # verbose=False: `_truncate` warns about over-long prompts, once, by name.
        return self.tokenizer(prompts, verbose=False)["input_ids"]

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def file_hash(paths: list[Path]) -> str:
    """The first 12 hex digits of the SHA-256 of the files' bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def check_encoder_spec(spec: str) -> str:
    """`spec` when it names an encoder ("wordllama" or "clip:DIR"), else a ValueError listing them."""
    if spec != "wordllama" and not (spec.startswith("clip:") and spec[len("clip:"):]):
        raise ValueError(f"unknown text encoder {spec!r}; expected {ENCODER_SPECS}")
    return spec


@functools.cache
def load_text_encoder(spec: str) -> TextEncoder:
    """The encoder named by `spec`: "wordllama" or "clip:DIR". Loaded once per spec, then shared."""
    if check_encoder_spec(spec) == "wordllama":
        found = importlib.util.find_spec("wordllama")
        if found is None or not found.submodule_search_locations:
            raise ImportError(f"text encoder 'wordllama' needs the package wordllama, which is not installed: "
                              f"{WORDLLAMA_INSTALL}")
        return WordLlamaEncoder(Path(found.submodule_search_locations[0]))
    return ClipTextEncoder(Path(spec[len("clip:"):]).resolve())


def encoder_spec(identity: str) -> str:
    """The `load_text_encoder` spec of an encoder identity ("wordllama:...@hash" -> "wordllama")."""
    name = identity.rpartition("@")[0]
    return "wordllama" if name.startswith("wordllama:") else name


def check_encoder_matches(table: PromptTable, encoder: TextEncoder) -> None:
    """Refuse to embed new prompts for a table's model with an encoder other than the table's."""
    if encoder.identity != table.encoder:
        raise ValueError(f"text encoder {encoder.identity} is not the one that made the prompt table "
                         f"({table.encoder}); a new prompt must be embedded by the same encoder, with the "
                         f"same weights, as the prompts the model was trained on")


def load_table_encoder(table: PromptTable) -> TextEncoder:
    """The encoder that made `table`, loaded again and checked to be the same (same weights)."""
    encoder = load_text_encoder(encoder_spec(table.encoder))
    check_encoder_matches(table, encoder)
    return encoder


# --------------------------------------------------------------------------- the table


@dataclass
class PromptTable:
    context: torch.Tensor  # [N, L, D] float32; zero past each prompt's tokens
    mask: torch.Tensor  # [N, L] bool; True at a prompt's tokens
    prompts: list[str]  # N prompts; prompt i embeds class i, the last is "" (the unconditional row)
    encoder: str  # identity of the encoder that made it
    class_names: list[str]  # N - 1 names

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, L, D)."""
        n, length, dim = self.context.shape
        return n, length, dim

    @property
    def num_prompts(self) -> int:
        """The class prompts: N - 1 (the "" row not counted)."""
        return self.context.shape[0] - 1

    @property
    def context_dim(self) -> int:
        return self.context.shape[2]

    def validate(self, where: str) -> None:
        """ValueError naming `where` unless the table is as the module doc says."""
        context, mask = self.context, self.mask
        if context.dim() != 3 or context.dtype != torch.float32 or context.shape[0] < 2 or 0 in context.shape:
            raise ValueError(f"prompt table {where}: context must be float32 [N, L, D] with N >= 2 (a class "
                             f"and the \"\" row) and L, D >= 1, got {context.dtype} {tuple(context.shape)}; "
                             f"{RERUN_HINT}")
        if mask.shape != context.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"prompt table {where}: mask must be bool {tuple(context.shape[:2])} for context "
                             f"{tuple(context.shape)}, got {mask.dtype} {tuple(mask.shape)}; {RERUN_HINT}")
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt table {where}: mask row(s) {empty} have no True (no token to attend "
                             f"to); {RERUN_HINT}")
        bad = (~torch.isfinite(context).flatten(1).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"prompt table {where}: context row(s) {bad} hold NaN/inf values; {RERUN_HINT}")
        n = context.shape[0]
        if len(self.prompts) != n or self.prompts[-1] != "":
            raise ValueError(f"prompt table {where}: needs {n} prompts (one per context row), the last \"\", "
                             f"got {len(self.prompts)} ending in {self.prompts[-1:]}; {RERUN_HINT}")
        if len(self.class_names) != n - 1:
            raise ValueError(f"prompt table {where}: needs {n - 1} class names (one per row but the last), "
                             f"got {len(self.class_names)}; {RERUN_HINT}")


def build_prompt_table(class_names: list[str], encoder: TextEncoder, template: str = DEFAULT_TEMPLATE,
                       prompts: list[str] | None = None) -> PromptTable:
    """Embed one prompt per class, then "": prompt i is prompts[i] when given, else
    template.format(class name with "_" read as " ")."""
    class_names = list(class_names)
    if not class_names:
        raise ValueError("a prompt table needs at least one class name")
    if prompts is None:
        prompts = [fill_template(template, name.replace("_", " ")) for name in class_names]
    elif len(prompts) != len(class_names):
        raise ValueError(f"{len(prompts)} prompts for {len(class_names)} classes {class_names}: give exactly "
                         f"one prompt per class, in the classes' order")
    blank = [name for name, prompt in zip(class_names, prompts) if not prompt.strip()]
    if blank:
        raise ValueError(f"the prompt of class(es) {blank} is empty; \"\" is the unconditional row's prompt, "
                         f"give each class a prompt of its own")
    rows = [*prompts, ""]
    context, mask = encoder.encode(rows)
    table = PromptTable(context, mask, rows, encoder.identity, class_names)
    table.validate(f"built by {encoder.identity}")
    return table


def fill_template(template: str, name: str) -> str:
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{}} for the class name; e.g. {DEFAULT_TEMPLATE!r}")
    try:
        return template.format(name)
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(f"prompt template {template!r}: use {{}} once for the class name and {{{{ }}}} for "
                         f"literal braces ({err!r})") from err


def write_prompt_table(path: str | Path, table: PromptTable) -> None:
    """Write a table file atomically (safe_files.replacing): a crash leaves the old file or the new
    one, never half of one. Refuses what `read_prompt_table` would refuse."""
    path = Path(path)
    table.validate(str(path))
    metadata = {"format": TABLE_FORMAT, "prompts": json.dumps(table.prompts),
                "class_names": json.dumps(table.class_names), "encoder": table.encoder}
    tensors = {"context": table.context.detach().cpu().contiguous(), "mask": table.mask.detach().cpu().contiguous()}
    with replacing(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def read_prompt_table(path: str | Path) -> PromptTable:
    """Read a table file (onto the CPU), with errors that name the file and say how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt table not found: {path}; run engine-embed-text first "
                                f"(engine-embed-text --classes NAME,NAME --out {path})")
    tensors, metadata = read_tensor_file(path, "prompt table", ("context", "mask"), TABLE_FORMAT, RERUN_HINT)
    try:
        prompts, class_names = json.loads(metadata["prompts"]), json.loads(metadata["class_names"])
        table = PromptTable(tensors["context"], tensors["mask"], prompts, metadata["encoder"], class_names)
    except (KeyError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise ValueError(f"prompt table {path}: metadata is missing or malformed ({type(err).__name__}); "
                         f"{RERUN_HINT}") from err
    if not (_is_str_list(prompts) and _is_str_list(class_names)):
        raise ValueError(f"prompt table {path}: metadata prompts and class_names must be JSON lists of "
                         f"strings; {RERUN_HINT}")
    table.validate(str(path))
    return table


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
