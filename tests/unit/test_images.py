"""Pictures (data.dataset=images): reading folders, the training patches, the tiles, and every
mistake a folder can hold, each in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_pictures
from train.data import DataError
from train.images import MARGIN, Patches, denoise_tiled, load_pictures
from train.model import UNet
from train.noise import add_noise, stream_key

CPU = torch.device("cpu")


def _load(folder, channels=0, limit=64.0, min_side=11, key="data.train_dir"):
    return load_pictures(str(folder), key, channels, CPU, limit, min_side)


def test_a_folder_is_read_recursively_in_every_format_and_depth(tmp_path):
    from PIL import Image

    write_pictures(tmp_path / "a", [(40, 50)], channels=3, suffix=".png")
    write_pictures(tmp_path / "a" / "deeper", [(30, 20)], channels=1, seed=1, suffix=".tif")
    write_pictures(tmp_path / "a" / "deeper", [(33, 35)], channels=3, seed=2, suffix=".jpg")
    sixteen = write_pictures(tmp_path / "b", [(25, 27)], channels=1, seed=3, suffix=".png", bits=16)[0]
    sixteen = sixteen.rename(tmp_path / "a" / "z16.png")
    (tmp_path / "a" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match="mixes gray and colour pictures .* set data.channels=1 or 3"):
        _load(tmp_path / "a")
    gray = _load(tmp_path / "a", channels=1)
    assert len(gray) == 4 and gray.channels == 1 and gray.pixels.dtype == torch.float32  # a 16-bit one: float
    assert [p.relative_to(tmp_path / "a").as_posix() for p in gray.paths] == [
        "deeper/p0.jpg", "deeper/p0.tif", "p0.png", "z16.png"]  # sorted by path
    i = [p.name for p in gray.paths].index("z16.png")
    expected = np.asarray(Image.open(sixteen), dtype=np.float64) / 65535  # all 16 bits kept
    assert np.abs(gray.picture(i)[0, 0].numpy() - expected).max() < 1e-6
    colour = _load(tmp_path / "a", channels=3)
    assert colour.channels == 3 and colour.picture(i).shape == (1, 3, 25, 27)
    assert torch.equal(colour.picture(i)[0, 0], colour.picture(i)[0, 2])  # gray repeated


def test_linked_subfolders_are_searched_once_and_a_loop_ends(tmp_path):
    from train.images import find_pictures

    write_pictures(tmp_path / "a", [(40, 40)])
    write_pictures(tmp_path / "elsewhere", [(40, 40)], seed=1)
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "elsewhere")  # pictures kept on another disk, say
    (tmp_path / "a" / "again").symlink_to(tmp_path / "elsewhere")  # the same folder a second way: counted once
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "a")  # back up the tree
    write_pictures(tmp_path / "beside", [(40, 40)], seed=2)
    (tmp_path / "a" / "up").symlink_to(tmp_path)  # above the folder: would take in every folder beside it
    found = [p.relative_to(tmp_path / "a").as_posix() for p in find_pictures(tmp_path / "a", "data.train_dir")]
    assert found == ["again/p0.png", "p0.png"]


def test_the_fingerprint_follows_the_pictures_bytes_and_names(tmp_path):
    paths = write_pictures(tmp_path / "a", [(40, 40), (40, 40)])
    first = _load(tmp_path / "a").fingerprint
    assert _load(tmp_path / "a").fingerprint == first
    paths[1].rename(tmp_path / "a" / "renamed.png")
    assert _load(tmp_path / "a").fingerprint != first
    write_pictures(tmp_path / "a", [(40, 40)], seed=5)  # p0.png replaced by another picture
    assert _load(tmp_path / "a").fingerprint not in (first,)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "small", "bomb", "memory"])
def test_a_bad_folder_is_one_error_naming_the_problem(tmp_path, monkeypatch, case):
    folder = tmp_path / "a"
    if case != "missing":
        folder.mkdir()
    if case in ("unreadable", "small", "bomb", "memory"):
        write_pictures(folder, [(64, 64), (30, 64) if case == "small" else (64, 64)])
    if case == "unreadable":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if case == "bomb":
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then more than twice it
    words = {"missing": "is not a folder", "empty": "holds no pictures", "unreadable": "1 picture Pillow cannot read: "
             "broken.png", "small": "1 picture smaller than 48 pixels a side (p1.png): remove them or lower "
             "data.patch_size", "bomb": "decompression bomb", "memory": "more than the 0.0 MiB"}[case]
    with pytest.raises(DataError) as e:
        _load(folder, limit=0.001 if case == "memory" else 64, min_side=48)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_pictures_over_the_memory_limit_are_refused_from_their_headers_before_any_is_decoded(tmp_path, monkeypatch):
    import train.images

    folder = write_pictures(tmp_path / "a", [(64, 64), (64, 64)], channels=3)[0].parent
    pixels_mib = 2 * 64 * 64 / 2**20  # the least they take decoded: a byte a pixel; colour takes 3
    with pytest.raises(DataError, match=r"take 0\.0 MiB decoded \(uint8\), more than"):
        _load(folder, limit=2 * pixels_mib)  # the headers fit, the decoded colour does not: refused exactly
    decoded = []
    monkeypatch.setattr(train.images, "read_picture", lambda *a: decoded.append(a))
    with pytest.raises(DataError, match="take at least 0.0 MiB decoded, more than the 0.0 MiB that data.memory_limit_mib"):
        _load(folder, limit=pixels_mib / 2)
    assert not decoded  # refused from the headers, before any picture was decoded


def test_patches_are_a_function_of_seed_epoch_and_index_alone(tmp_path):
    pictures = _load(write_pictures(tmp_path / "a", [(70, 90), (64, 64), (100, 66)])[0].parent)
    patches = Patches(pictures, 32, 5)
    assert len(patches) == 15 and patches.sample_shape == (3, 32, 32)
    key = stream_key(0, 3)
    every = patches.batch(torch.arange(15), key)
    for order in (torch.tensor([7, 2, 11]), torch.tensor([11]), torch.randperm(15)):
        assert torch.equal(patches.batch(order, key), every[order])  # any batch, any rank: the same patch
    assert not torch.equal(patches.batch(torch.arange(15), stream_key(0, 4)), every)  # another epoch: others
    # Each patch is a crop of its picture (k % 3) in one of the 8 flips and rotations.
    for k in range(15):
        picture = pictures.picture(k % 3)[0]
        h, w = picture.shape[1:]
        crops = [picture[:, y:y + 32, x:x + 32] for y in range(h - 31) for x in range(w - 31)]
        views = [t for c in crops for t in (c, c.flip(1), c.flip(2), c.flip(1).flip(2))]
        views += [t.transpose(1, 2) for t in views]
        assert any(torch.equal(every[k], v) for v in views), k
    # Noise of a patch (hashed `wide`) is as independent of the batch as the patch itself.
    noisy = add_noise(every, torch.arange(15), 0.1, 0, 3, wide=True)
    assert torch.equal(add_noise(every[[4, 9]], torch.tensor([4, 9]), 0.1, 0, 3, wide=True), noisy[[4, 9]])



def receptive_radius(model: torch.nn.Module, channels: int, size: int = 96) -> int:
    """How far (pixels) a change at one pixel reaches in the model's output: measured, not
    derived, with a probe on a `size`-pixel picture."""
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    centre = size // 2
    y = x.clone()
    y[..., centre, centre] += 0.5
    with torch.no_grad():
        diff = (model(x) - model(y)).abs().amax(1)[0]
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    return int(max((rows - centre).abs().max(), (cols - centre).abs().max())) if len(rows) else 0


@pytest.mark.parametrize("channels,size", [(1, (37, 53)), (3, (300, 410))])
def test_tiles_give_the_whole_pictures_result_to_rounding(channels, size):
    torch.manual_seed(0)
    model = UNet(8, 3, image_channels=channels).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # the head starts at zero: make the output depend on x
    assert receptive_radius(model, channels) < MARGIN  # what makes a tile's kept core exact
    x = torch.rand(1, channels, *size)
    with torch.no_grad():
        whole = model(x)
        assert whole.shape == x.shape  # odd sizes padded and cropped back
        tiled = denoise_tiled(model, x, tile=32, margin=MARGIN)
    assert (whole - tiled).abs().max() < 1e-5
    if size[0] > 32 + 2 * MARGIN:  # a margin short of the receptive radius would show seams
        with torch.no_grad():
            assert (whole - denoise_tiled(model, x, tile=32, margin=4)).abs().max() > 1e-4
