"""Official preprocessing on hand-made images: RGBA on white, grayscale, palette, CMYK, 16-bit, EXIF, corrupt."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from chameleon_jax.vqgan import images as I
from numerics import U


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


PIXEL_TOL = 2 * U * 2  # fp32 p/127.5 - 1 vs float64: two roundings of values <= 2


def test_rgba_is_composited_on_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200                   # red channel
    a[:4, :, 3] = 0                   # top half fully transparent -> white
    a[4:, :, 3] = 128                 # bottom half half-transparent
    x = I.load_image(_png(Image.fromarray(a, "RGBA")), size=8)
    np.testing.assert_allclose(x[:4], 1.0)                      # 255 -> +1
    expect = (1 - 128 / 255) * 255 + 128 / 255 * np.array([200, 0, 0])
    # truncated; p/127.5 - 1 in fp32: two roundings of values <= 2 against float64
    np.testing.assert_allclose(x[4:], np.broadcast_to(np.floor(expect) / 127.5 - 1, (4, 8, 3)), rtol=0, atol=PIXEL_TOL)


def test_opaque_rgba_and_range():
    a = np.full((6, 6, 4), 255, np.uint8)
    a[..., :3] = 0
    x = I.load_image(Image.fromarray(a, "RGBA"), size=6)
    assert x.dtype == np.float32 and x.shape == (6, 6, 3)
    np.testing.assert_allclose(x, -1.0)


def test_grayscale_palette_cmyk_and_16bit():
    g = I.load_image(_png(Image.fromarray(np.full((4, 4), 51, np.uint8), "L")), size=4)
    np.testing.assert_allclose(g, 51 / 127.5 - 1, rtol=0, atol=PIXEL_TOL)
    pal = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    np.testing.assert_allclose(I.load_image(_png(pal), size=4)[0, 0], np.array([10, 200, 30]) / 127.5 - 1, rtol=0,
                               atol=PIXEL_TOL)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in PIL's naive CMYK->RGB
    # JPEG at quality 100 still rounds its DCT coefficients: a few levels of 255 (0.05 ~ 3 levels)
    np.testing.assert_allclose(I.load_image(_png(cmyk, "JPEG", quality=100), size=4)[..., 0], 1.0, atol=0.05)
    np.testing.assert_allclose(I.load_image(_png(cmyk, "JPEG", quality=100), size=4)[..., 1:], -1.0, atol=0.05)
    deep = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # mode I;16: half scale, not clipped to white
    assert deep.mode.startswith("I")
    # 16 bits to 8 may round or truncate: one 8-bit level, 1/127.5
    np.testing.assert_allclose(I.load_image(_png(deep), size=4), 128 / 127.5 - 1, atol=1 / 127.5)


def test_exif_rotation_is_applied():
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = 255                    # left half white in storage order
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6                  # "rotate 90 CW to display"
    out = I.to_rgb(Image.open(io.BytesIO(_png(img, "JPEG", exif=exif.tobytes(), quality=100))))
    assert out.size == (4, 8)         # width and height swapped
    arr = np.asarray(out)
    assert arr[:3].mean() > 200 and arr[-3:].mean() < 50   # white on top after rotating


def test_shorter_side_resize_and_centre_crop():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255                 # the central 20 columns white
    x = I.load_image(Image.fromarray(a), size=10)
    assert x.shape == (10, 10, 3)
    assert x[:, 2:8].min() > 0.9      # centre crop keeps the white band
    x2 = I.preprocess(Image.fromarray(a), 20)
    np.testing.assert_allclose(x2, np.asarray(a[:, 10:30], np.float32) / 127.5 - 1)


def test_corrupt_and_truncated_files_are_counted_skips(tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(I.BadImage, match="junk.jpg"):
        I.load_image(str(junk))
    with caplog.at_level(logging.WARNING):
        arr, kept, skips = I.load_images([str(good), str(trunc), str(junk), str(tmp_path / "missing.png")], size=8)
    assert arr.shape == (1, 8, 8, 3) and kept == [0]
    assert skips.count == 3 and len(skips.reasons) == 3
    assert "skipping image" in caplog.text


def test_to_uint8_clamps_and_truncates():
    np.testing.assert_array_equal(I.to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 3.0])), [0, 0, 127, 254, 255])
