"""Bad input gets one line naming the culprit and exit 2, never a traceback: the params file and --set
values (through a real stage process), image folders and idx files (prepare), unreachable S3 endpoints.
And images that cannot be converted faithfully are refused, not silently mangled."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from gen_core.config import ConfigError, load_config
from gen_core.data import DataError, decode_image, fit_image, read_idx, read_source
from gen_core.config import DataConfig
from tests.conftest import run_cli, subprocess_env

GOOD = "data:\n  source: mnist5k\n"


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        (b"\xff\xfe not utf-8 \x80", [], "params.yaml: not UTF-8 text (byte 0)"),
        (b"", [], "params.yaml: empty; a params file must set the run"),
        (GOOD.encode(), ["gan.lr_g=["], "override 'gan.lr_g=[': value is not valid YAML"),
        (GOOD.encode(), ["gan.lr_g=!!python/object/apply:os.system ['echo pwned']"], "value is not valid YAML (could not determine a constructor"),
        (GOOD.encode(), ["gan.ema_halflife_kimg=.inf"], "gan.ema_halflife_kimg: Input should be a finite number"),
        (GOOD.encode(), ["gan.lr_g=.nan"], "gan.lr_g: Input should be a finite number"),
    ],
    ids=["not_utf8", "empty", "unclosed_yaml", "python_tag", "inf", "nan"],
)
def test_bad_params_are_one_line_from_a_real_stage(tmp_path, content, overrides, message):
    (tmp_path / "params.yaml").write_bytes(content)
    args = ["python", "-m", "pipelines.prepare", "--params", str(tmp_path / "params.yaml")]
    for override in overrides:
        args += ["--set", override]
    line = one_line_error(run_cli(args, tmp_path))
    assert message in line
    assert not (tmp_path / "pwned").exists()


def test_a_params_path_that_is_a_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a params file"):
        load_config(tmp_path)


def test_an_unreachable_s3_endpoint_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(f"data:\n  source: image_folder\n  source_uri: s3://images/set\n  out_dir: {tmp_path}/out\n")
    env = subprocess_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    line = one_line_error(run_cli(["python", "-m", "pipelines.prepare", "--params", str(tmp_path / "params.yaml")], tmp_path, env=env))
    assert line.startswith("error: S3 endpoint http://127.0.0.1:9 unreachable: Could not connect to the endpoint URL")


def _folder(root, extra: dict) -> DataConfig:
    for label in range(2):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i + 10 * label, np.uint8)).save(root / f"c{label}" / f"{i}.png")
    for name, make in extra.items():
        make(root / "c0" / name)
    return DataConfig(source="image_folder", source_uri=str(root), resize="pad", eval_images=10)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("dangling.png", lambda path: path.symlink_to(path.parent / "gone.png"), "unreadable (file not found: a dangling link?)"),
        ("dir.png", lambda path: path.mkdir(), "a directory, not an image file"),
        ("float.png", lambda path: Image.fromarray(np.ones((28, 28), np.float32)).save(path, format="TIFF"), "floating-point image (mode F, TIFF)"),
        ("tiny.png", lambda path: Image.fromarray(np.zeros((1, 1), np.uint8)).save(path), "too small (1x1)"),
    ],
    ids=["dangling_symlink", "directory", "float_tiff", "one_pixel"],
)
def test_bad_files_in_an_image_folder_are_named_or_skipped_and_listed(tmp_path, name, make, reason):
    cfg = _folder(tmp_path / "set", {name: make})
    with pytest.raises(DataError) as err:
        read_source(cfg)
    assert str(err.value).startswith(f"{tmp_path}/set/c0/{name}: {reason}") and "\n" not in str(err.value)
    raw = read_source(cfg.model_copy(update={"on_bad_image": "skip"}))
    assert [s["file"] for s in raw.skipped] == [f"{tmp_path}/set/c0/{name}"] and raw.skipped[0]["reason"].startswith(reason)
    assert len(raw.train.labels) == 6


def test_a_bad_image_through_prepare_is_one_line(tmp_path):
    _folder(tmp_path / "set", {"dir.png": lambda path: path.mkdir()})
    (tmp_path / "params.yaml").write_text(f"data:\n  source: image_folder\n  source_uri: {tmp_path}/set\n  out_dir: {tmp_path}/out\n  resize: pad\n")
    line = one_line_error(run_cli(["python", "-m", "pipelines.prepare", "--params", str(tmp_path / "params.yaml")], tmp_path))
    assert line == f"error: {tmp_path}/set/c0/dir.png: a directory, not an image file"
    assert not (tmp_path / "out").exists()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    decoded = decode_image((tmp_path / "ramp.png").read_bytes(), "ramp.png", 1)[..., 0]
    assert np.array_equal(decoded, np.round(ramp / 257.0).astype(np.uint8))
    assert (decoded == 255).mean() < 0.01  # clipping made 99.6% of such pixels 255


def test_integer_images_beyond_16_bits_are_refused():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 1 << 20, np.int32)).save(buffer, format="TIFF")
    with pytest.raises(DataError, match="only 8- and 16-bit images are accepted"):
        decode_image(buffer.getvalue(), "deep.tif", 1)


def test_small_images_are_refused_in_both_fit_modes():
    for mode in ("pad", "resize"):
        with pytest.raises(DataError, match="too small"):
            fit_image(np.zeros((15, 32, 1), np.uint8), "x", 32, 1, mode)
    assert fit_image(np.zeros((16, 16, 1), np.uint8), "x", 32, 1, "pad").shape == (32, 32, 1)  # half the resolution is fine


def test_an_idx_header_whose_dimensions_overflow_is_one_line(tmp_path):
    """np.prod over the header's uint32 dimensions wrapped around to 0, so an empty payload 'matched'."""
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBB", 0, 0, 0x08, 4) + struct.pack(">4I", 65536, 65536, 65536, 65536)))
    with pytest.raises(DataError, match=r"payload is 0 bytes, header \[65536, 65536, 65536, 65536\] needs 18446744073709551616"):
        read_idx(str(path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_use_gpu_without_a_gpu_is_one_line_not_an_endless_wait(tmp_path):
    # Ray Train's worker group would wait forever for a GPU the local Ray cannot have (fsdp: not in-process)
    (tmp_path / "params.yaml").write_text(GOOD)
    args = ["python", "-m", "pipelines.train_gan", "--params", str(tmp_path / "params.yaml"), "--set", "ray.use_gpu=true",
            "--set", "ray.strategy=fsdp", "--set", "ray.num_workers=2"]  # fmt: skip
    line = one_line_error(run_cli(args, tmp_path, timeout=120))
    assert line == "error: ray.use_gpu: 2 worker(s) need 2 GPU(s), this machine has 0; set ray.use_gpu: false, or join a GPU cluster with ray.address"
