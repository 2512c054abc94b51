"""gen_core.text_encoder: all-MiniLM-L6-v2 from the installed wheel, offline, checked against its pinned sha256s, and
equal to the upstream model: the sentence-transformers README's similarity matrix for this model, to 4 decimals."""

import shutil

import pytest
import torch

from gen_core.text_encoder import PINNED_SHA256, TextEncoder, TextEncoderError, package_dir


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
        return TextEncoder()


def test_the_sentence_embedding_is_the_upstream_models(encoder):
    """sentence-transformers' README, all-MiniLM-L6-v2: similarities 0.6660, 0.1046, 0.1411 for these three sentences."""
    pooled = encoder.encode(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]).pooled
    assert pooled.shape == (3, 384) and torch.allclose(pooled.norm(dim=1), torch.ones(3))
    similarity = pooled @ pooled.T
    assert [round(similarity[0, 1].item(), 4), round(similarity[0, 2].item(), 4), round(similarity[1, 2].item(), 4)] == [0.6660, 0.1046, 0.1411]


def test_token_states_are_masked_and_independent_of_the_batch(encoder):
    alone = encoder.encode(["a dark sneaker"])
    batch = encoder.encode(["a dark sneaker", "a photo of a light ankle-boot, filling the frame"])
    length = alone.hidden.shape[1]
    assert batch.hidden.shape[1] > length and batch.mask[0, length:].sum() == 0 and batch.mask[1].all()
    assert (batch.hidden[0, :length] - alone.hidden[0]).abs().max() < 1e-4
    assert (batch.pooled[0] - alone.pooled[0]).abs().max() < 1e-5
    dark, light = encoder.encode(["a dark sneaker", "a light sneaker"]).pooled
    assert (dark @ light).item() < 0.99  # the attribute word changes the embedding
    with pytest.raises(TypeError, match="a list of strings"):
        encoder.encode("a sneaker")


def test_files_that_are_not_the_pinned_release_are_refused_in_one_line(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(package_dir(), copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(TextEncoderError, match=r"tokenizer.json: sha256 is not the pinned sentence-transformers/all-MiniLM-L6-v2 release's") as err:
        TextEncoder(copy)
    assert "\n" not in str(err.value)
    (copy / "model.safetensors").unlink()
    with pytest.raises(TextEncoderError, match=r"model.safetensors is missing"):
        TextEncoder(copy)
    assert set(PINNED_SHA256) == {"model.safetensors", "tokenizer.json"}
