"""pneumo_edge.inputs.images: the one preprocessing, on real decodes of generated files."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from pneumo_edge.inputs.images import MAX_PIXELS, ImageError, load_image


def gradient(w=300, h=200):
    x = np.linspace(0, 255, w, dtype=np.float64)
    y = np.linspace(0, 1, h)[:, None]
    return np.clip(x[None, :] * (0.5 + y / 2), 0, 255).astype(np.uint8)


def save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_grey_png_shape_dtype_and_values(tmp_path):
    g = gradient()
    p = save(tmp_path, "g.png", Image.fromarray(g))
    out = load_image(p, 64)
    assert out.shape == (1, 64, 64) and out.dtype == np.uint8 and out.flags.c_contiguous
    expected = np.asarray(Image.fromarray(g).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(out[0], expected)


def test_rgb_rgba_palette_cmyk_agree_with_grey(tmp_path):
    g = gradient()
    ref = load_image(save(tmp_path, "ref.png", Image.fromarray(g)), 64).astype(int)
    rgb = Image.fromarray(np.stack([g] * 3, -1))
    for name, im in [("rgb.png", rgb), ("rgba.png", rgb.convert("RGBA")),
                     ("pal.png", rgb.convert("P")), ("cmyk.tif", rgb.convert("CMYK")),
                     ("bmp.bmp", rgb)]:
        out = load_image(save(tmp_path, name, im), 64).astype(int)
        tol = 8 if name == "pal.png" else 2  # palette quantises
        assert np.abs(out - ref).max() <= tol, name


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    g16 = (gradient().astype(np.uint32) * 257).astype(np.uint16)  # full 16-bit range
    p = tmp_path / "g16.png"
    Image.fromarray(g16).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p, 64)
    ref = load_image(save(tmp_path, "g8.png", Image.fromarray(gradient())), 64)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert out.max() > 200 and (out < 128).mean() > 0.3  # clipping would make it all 255


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((100, 200), np.uint8)
    arr[:, :100] = 255  # bright left half
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p, 32)[0].astype(int)
    # upright image is 100 wide x 200 tall with the bright half on top
    assert out[:12].mean() > 200 and out[-12:].mean() < 50


def test_jpeg_draft_used_and_consistent(tmp_path):
    big = Image.fromarray(np.kron(gradient(400, 300), np.ones((5, 5), np.uint8)))  # 2000x1500
    p = save(tmp_path, "big.jpg", big, quality=92)
    out = load_image(p, 224)
    full = np.asarray(Image.open(p).convert("L").resize((224, 224), Image.Resampling.BILINEAR))
    assert out.shape == (1, 224, 224)
    assert np.abs(out[0].astype(int) - full.astype(int)).mean() < 2.0


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"this is not an image\n", "not a recognised image"),
])
def test_bad_files_raise_one_line_error_naming_file(tmp_path, content, reason):
    p = tmp_path / "x.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as ei:
        load_image(p, 64)
    msg = str(ei.value)
    assert msg.startswith(str(p)) and reason in msg and "\n" not in msg


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file_is_refused_not_filled(tmp_path, fmt, ext):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)).save(buf, fmt)
    p = tmp_path / f"t.{ext}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(p, 64)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(p, optimize=True)  # 144 MP, tiny file
    assert os.path.getsize(p) < 1_000_000
    with pytest.raises(ImageError, match="too large"):
        load_image(p, 64)
    assert 12000 * 12000 > MAX_PIXELS


def test_missing_directory_and_broken_symlink(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png", 64)
    d = tmp_path / "dir.png"
    d.mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_image(d, 64)
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(link, 64)


def test_non_square_input_is_squashed_to_square(tmp_path):
    arr = np.zeros((100, 300), np.uint8)
    arr[:, 150:] = 255
    out = load_image(save(tmp_path, "wide.png", Image.fromarray(arr)), 30)[0]
    assert out.shape == (30, 30)
    assert out[:, :13].max() == 0 and out[:, 17:].min() == 255


def test_float_tiff_is_scaled_over_its_own_range_not_clipped(tmp_path):
    """A 0..4080 float TIFF (mode F): its darkest pixel is 0, its brightest 255, and it looks
    like the same image stored as 8-bit (today it came out 89 % saturated white)."""
    g = gradient()
    p = save(tmp_path, "f.tif", Image.fromarray(g.astype(np.float32) * 16.0, mode="F"))
    assert Image.open(p).mode == "F"
    out = load_image(p, 64)
    ref = load_image(save(tmp_path, "g8.png", Image.fromarray(g)), 64)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert (out == 255).mean() < 0.05 and (out < 128).mean() > 0.3


def test_float_offset_range_and_32bit_int_use_their_own_range(tmp_path):
    g = gradient().astype(np.float64)
    ref = load_image(save(tmp_path, "g8.png", Image.fromarray(gradient())), 64).astype(int)
    shifted = Image.fromarray((g / 255.0 * 2.0 - 1.0).astype(np.float32), mode="F")  # -1..1
    wide = Image.fromarray((g * 1000 - 70000).astype(np.int32), mode="I")  # negative 32-bit
    for name, im in [("s.tif", shifted), ("w.tif", wide)]:
        out = load_image(save(tmp_path, name, im), 64).astype(int)
        assert np.abs(out - ref).max() <= 1, name


@pytest.mark.parametrize("fill,reason", [(np.nan, "NaN or infinite"),
                                         (np.inf, "NaN or infinite"),
                                         (None, "constant")])
def test_float_image_with_nan_inf_or_no_range_is_refused(tmp_path, fill, reason):
    arr = np.full((50, 60), 7.5, np.float32)
    if fill is not None:
        arr[:5] = np.linspace(0, 100, 60)
        arr[10, 10] = fill
    p = save(tmp_path, "bad.tif", Image.fromarray(arr, mode="F"))
    with pytest.raises(ImageError, match=reason) as info:
        load_image(p, 32)
    assert str(p) in str(info.value) and "\n" not in str(info.value)
