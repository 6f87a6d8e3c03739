"""Previews of the denoising (preview.py): which steps become frames, the cheap latent-to-RGB map, and the
--preview / --preview-grid files of txt2img, img2img and inpaint (sample's: test_pixel.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.__main__ import main
from sdlite.image import to_images
from sdlite.pipeline import Step
from sdlite.preview import SD1_LATENT_RGB, Preview, approximate_rgb

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default"


def steps(total: int, batch: int = 2) -> list[Step]:
    return [Step(i, total, torch.tensor(999 - i), torch.full((batch, 3, 4, 6), i / total),
                 torch.full((batch, 3, 4, 6), -i / total)) for i in range(total)]


@pytest.mark.parametrize("total, every, kept", [(7, 3, [3, 6, 7]), (6, 3, [3, 6]), (25, None, [3, 6, 9, 12, 15, 18,
                                                                                               21, 24, 25])])
def test_frames_are_every_kth_step_and_the_last(total, every, kept):
    """Frames at steps k, 2k, ... and the last (default k: total / 10 rounded up); each frame the batch's x above
    its predicted x_0."""
    decoded = []

    def decode(x):
        decoded.append(x[0, 0, 0, 0].item())
        return to_images(x)

    preview = Preview(decode, every)
    for step in steps(total):
        preview(step)
    assert decoded[::2] == [pytest.approx((n - 1) / total) for n in kept]   # x of step n (index n - 1), then x0
    assert len(preview.frames) == len(kept) and preview.frames[0].size == (2 * 6, 2 * 4)
    frame = np.asarray(preview.frames[-1])
    assert np.array_equal(frame[:4, :6], np.asarray(to_images(steps(total)[-1].x)[0]))
    assert np.array_equal(frame[4:, 6:], np.asarray(to_images(steps(total)[-1].x0)[1]))


def test_approximate_rgb_is_the_linear_map_per_latent_pixel():
    """Each latent pixel becomes an 8 x 8 block of the colour latents @ SD1_LATENT_RGB (recomputed in float64)."""
    latents = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    images = approximate_rgb(latents)
    assert [image.size for image in images] == [(40, 24)] * 2
    rgb = torch.einsum("bchw,cr->bhwr", latents.double(), SD1_LATENT_RGB.double())
    expected = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().numpy()
    ours = np.stack([np.asarray(image)[::8, ::8] for image in images]).astype(float)
    # float32 against float64: a sum of 4 products, ~1e-7 relative, can cross a .5 rounding boundary: 1 level
    assert np.abs(ours - expected).max() <= 1
    assert all(np.array_equal(np.asarray(image)[::8, ::8].repeat(8, 0).repeat(8, 1), np.asarray(image))
               for image in images)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra", [[], ["--preview-fast"]])
def test_txt2img_writes_gif_and_grid(tmp_path, capsys, extra):
    """The GIF and the grid hold a frame per 2nd step; the last frame's top row is the image written (VAE decode),
    or its 8x-coarse approximation (--preview-fast)."""
    out = tmp_path / "a.png"
    code, err = run(capsys, "txt2img", "a red circle", "--model", DEFAULT_MODEL, "--steps", "4", "--seed", "1",
                    "--out", out, "--preview", tmp_path / "a.gif", "--preview-grid", tmp_path / "a-grid.png",
                    "--preview-every", "2", "--quiet", *extra)
    assert code == 0, err
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (64, 128)
    grid = np.asarray(Image.open(tmp_path / "a-grid.png"))
    assert grid.shape == (128, 128, 3)
    image = np.asarray(Image.open(out))
    if extra:   # the blocks of 8 x 8 pixels
        assert np.array_equal(grid[:64:8, 64::8].repeat(8, 0).repeat(8, 1), grid[:64, 64:])
    else:
        assert np.array_equal(grid[:64, 64:], image)


def test_img2img_and_inpaint_preview_the_steps_they_run(tmp_path, capsys):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "white").save(image)
    Image.new("L", (64, 64), 255).save(mask)
    code, err = run(capsys, "img2img", "a blue square", "--image", image, "--model", DEFAULT_MODEL, "--steps", "4",
                    "--strength", "0.5", "--seed", "1", "--out", tmp_path / "b.png", "--preview",
                    tmp_path / "b.gif", "--quiet")
    assert code == 0, err
    with Image.open(tmp_path / "b.gif") as gif:   # strength 0.5 of 4 steps: 2 steps, one frame each
        assert gif.n_frames == 2
    code, err = run(capsys, "inpaint", "a blue square", "--image", image, "--mask", mask, "--model", DEFAULT_MODEL,
                    "--steps", "3", "--seed", "1", "--out", tmp_path / "c.png", "--preview-grid",
                    tmp_path / "c-grid.png", "--quiet")
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "c-grid.png"))   # 3 frames, the last one's top row the image written
    assert grid.shape == (128, 3 * 64, 3)
    assert np.array_equal(grid[:64, 128:], np.asarray(Image.open(tmp_path / "c.png")))


@pytest.mark.parametrize("flags, words", [
    (["--preview", "p.png"], ["--preview", ".gif"]),
    (["--preview-grid", "p.gif"], ["--preview-grid", ".png"]),
    (["--preview", "p.gif", "--preview-every", "0"], ["--preview-every", "at least 1"]),
    (["--preview-every", "3"], ["--preview-every", "needs --preview"]),
    (["--preview-fast"], ["--preview-fast", "needs --preview"]),
    (["--preview", "taken.gif"], ["taken.gif", "exists", "--overwrite"]),
])
def test_preview_mistakes_are_refused_before_any_work(tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    Path("taken.gif").write_bytes(b"GIF89a")
    code, err = run(capsys, "txt2img", "a red circle", "--model", DEFAULT_MODEL, "--steps", "2", "--out", "a.png",
                    *flags)
    assert code == 2 and "\n" not in err and err.startswith("error: ")
    assert all(word in err for word in words), err
    assert not Path("a.png").exists() and Path("taken.gif").read_bytes() == b"GIF89a"
