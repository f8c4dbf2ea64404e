"""Images and videos as uint8 RGB arrays: images through Pillow, videos through imageio's ffmpeg plugin.

    image = read_image("ref.png")                  # (H, W, 3)
    frames, fps = read_video("drive.mp4")          # (T, H, W, 3), frames per second (None if unknown)
    write_video("out.mp4", frames, fps=15)         # appears atomically
    write_frames("out_frames", frames)             # 000000.png, ... (also atomically)

Every reader raises `MediaError` naming the file when it is missing, unreadable or empty, so a command line
tool can stop before doing any work. `write_video` encodes into a temporary file beside the target and renames
it into place, so a failed or interrupted run never leaves a partial video.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageOps

from xdyna_jax.io.atomic import atomic_folder, usual_mode


class MediaError(ValueError):
    """An image or video that cannot be read (missing, unreadable, empty)."""


def _rgb(image: np.ndarray, where: str) -> np.ndarray:
    """Grey, grey+alpha and RGBA images -> RGB uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise MediaError(f"{where}: expected 8-bit pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise MediaError(f"{where}: not an image (shape {image.shape})")
    if image.shape[2] in (1, 2):  # grey (+ alpha)
        image = np.repeat(image[..., :1], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB: alpha dropped, grey and palette expanded, and a camera's EXIF
    orientation applied (a phone photo stored sideways comes out upright)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except Exception as e:  # Pillow raises format-specific errors for corrupt or unknown files
        raise MediaError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e


def video_fps(path: str | Path) -> float | None:
    """The frame rate a video file records, or None when it records none."""
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            fps = reader.get_meta_data().get("fps")
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a video ({type(e).__name__}: {e})") from e
    return float(fps) if fps else None


def read_video(
    path: str | Path, *, stride: int = 1, limit: int | None = None
) -> tuple[np.ndarray, float | None]:
    """A video file -> (uint8 (T, H, W, 3) RGB frames, the file's fps or None).

    Keeps every `stride`-th frame starting with the first, at most `limit` of them (decoding stops there).
    """
    path = Path(path)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not path.is_file():
        raise MediaError(f"{path}: no such video file")
    frames = []
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            fps = reader.get_meta_data().get("fps")
            for i, frame in enumerate(reader):
                if limit is not None and len(frames) >= limit:
                    break
                if i % stride == 0:
                    frames.append(_rgb(frame, f"{path} frame {i}"))
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a video ({type(e).__name__}: {e})") from e
    if not frames:
        raise MediaError(f"{path}: the video has no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise MediaError(f"{path}: frames of different sizes")
    return np.stack(frames), (float(fps) if fps else None)


def write_video(path: str | Path, frames: np.ndarray, *, fps: float, quality: int = 8) -> Path:
    """uint8 (T, H, W, 3) RGB frames -> an H.264 mp4 at `fps`, written to a temporary sibling and renamed
    into place (the target is replaced only once the whole video is encoded).

    Sizes are kept as given (no macro-block rounding); H.264's yuv420p needs even heights and widths.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"frames must be a non-empty uint8 (T, H, W, 3) array, got {frames.dtype} {frames.shape}"
        )
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {frames.shape[1]}x{frames.shape[2]}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".mp4", dir=path.parent)
    os.close(fd)
    try:
        writer = imageio.get_writer(
            tmp, format="FFMPEG", fps=fps, codec="libx264", quality=quality, macro_block_size=1
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        except BaseException:
            # imageio's context manager skips close() on an error, leaving ffmpeg to write the file later
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
        usual_mode(Path(tmp), directory=False)  # mkstemp's file is private; the video gets the usual mode
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def write_frames(directory: str | Path, frames: np.ndarray) -> Path:
    """uint8 (T, H, W, 3) RGB frames -> directory/000000.png, ...; the folder is filled under a temporary
    name beside it and renamed into place, so it appears complete or not at all. It must not exist yet."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists")
    with atomic_folder(directory) as tmp:
        for i, frame in enumerate(np.asarray(frames)):
            Image.fromarray(frame).save(tmp / f"{i:06d}.png")
    return directory
