"""A procedural world of dancing characters, deterministic per seed, for training and evaluating on a CPU.

    python -m xdyna_jax.data.synthetic --out data/synth --identities 8 --clips-per-identity 4 --scenes 4 \\
        --frames 24 --height 128 --width 96 --seed 0
    python -m xdyna_jax.data.prepare --videos data/synth/videos --poses data/synth/poses \\
        --faces data/synth/faces --height 128 --width 96 --output data/synth_human
    python -m xdyna_jax.data.prepare --videos data/synth/scenes --scene --height 128 --width 96 \\
        --output data/synth_scene

Each identity (an int) is a character with its own palette and proportions (`synthetic_character`), each
motion seed a dance, each clip a background (`synthetic_scene`: waves, clouds, particles, plants). The
keypoints are exact: they are what the drawing (`synthetic_draw`) was made from.

Files under ROOT (`write_world`; the world is built in a temporary folder beside ROOT and renamed into
place when complete):
- videos/<stem>.mp4: a dancer (H.264, `io.video.write_video`), stem `id<identity:06d>_m<j:03d>`;
- poses/<stem>.npy: float32 (T, 134, 3) x, y, score in the video's pixels, DWPose's whole-body order:
  body 0-17 (OpenPose), feet 18-23 (left big toe, small toe, heel, then right), face 24-91 (iBUG 68),
  left hand 92-112, right hand 113-133 (OpenPose hand order). Score 1 for a point the frame shows, 0 for
  one off the canvas or hidden behind another body part (its coordinates are kept);
- faces/<stem>.npy: float32 (T, 68, 2) landmarks in the video's pixels, NaN rows for frames where none lies
  on the canvas;
- palettes/<stem>.json: {"format": "xdyna-synthetic-palette/1", "identity", "motion_seed", "limbs":
  17 x [r, g, b] in LIMBS order, "limb_names", "limb_width" (int px, the body limbs' diameter),
  "limb_widths" (17 diameters: the neck and the head limbs are thinner), "skin", "lips", "hair", "shoes",
  "clothing": [[r, g, b], [r, g, b]], "pattern", "hair_style", "background", "height", "width", "fps",
  "tolerance", "limb_shade", "max_background_chroma"}. `tolerance` (30, per channel) bounds how far a limb's
  core pixels (2 px or more inside the part of the limb in view) lie from its palette colour in the
  decoded mp4 (shading gives at most max |limb_shade| = 22, H.264 the rest; 28 is the worst measured);
  every other limb and clothing colour stays >= 39 per channel from a limb's shaded pixels, and
  every background pixel has chroma <= max_background_chroma (>= 63 in RGB distance from any limb);
- scenes/<stem>.mp4: scene-only clips (no character), stem `scene<seed:06d>`;
- references/id<identity:06d>.png (a still of the identity in a neutral stance), .npy (134, 3) keypoints
  and .json (its palette), for sampling demos;
- world.json: the arguments and every clip's stem, identity, motion seed and background.
Identity ids are seed * 10000 + i; clip j of identity n dances motion seed n * 1000 + j; scene k uses
seed * 10000 + k. A world with another --seed has none of the same identities or dances.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xdyna_jax.data.synthetic_character import (
    LIMB_SHADE,
    MAX_BACKGROUND_CHROMA,
    TOLERANCE,
    Motion,
    check_seed,
    make_identity,
    make_motion,
    pose_keypoints,
    rest_motion,
)
from xdyna_jax.data.synthetic_draw import (
    BODY_OWNERS,
    FACE_HIDERS,
    FEET_OWNERS,
    HAND_OWNERS,
    PART_NAMES,
    draw_frame,
    limb_radii,
    point_scores,
)
from xdyna_jax.data.synthetic_scene import BACKGROUNDS, pick_background, render_background
from xdyna_jax.io.atomic import atomic_folder

PALETTE_FORMAT = "xdyna-synthetic-palette/1"
WORLD_FORMAT = "xdyna-synthetic-world/1"
DEFAULT_FPS = 12.0
IDENTITY_STRIDE = 10_000  # identity ids of one world: seed * stride + i
MOTIONS_PER_IDENTITY = 1000  # motion seeds of one identity: identity * this + j


@dataclasses.dataclass(frozen=True)
class Clip:
    """A rendered clip and its exact keypoints (pixels of the frames; score 1 shown, 0 off-canvas or
    hidden)."""

    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    body: np.ndarray  # (T, 18, 3) x, y, score, OpenPose order
    hands: np.ndarray  # (T, 2, 21, 3) [left, right]
    face: np.ndarray  # (T, 68, 2), NaN rows where no landmark lies on the canvas
    palette: dict
    feet: np.ndarray  # (T, 6, 3) DWPose order
    face_scores: np.ndarray  # (T, 68)
    labels: np.ndarray  # int8 (T, H, W): part shown per pixel (synthetic_draw.PART_NAMES), -1, -2 mixed
    eyes_open: np.ndarray  # (T,) 1 open .. 0 shut
    mouth_open: np.ndarray  # (T,) 0 shut .. 1 wide

    def keypoints(self) -> np.ndarray:
        """(T, 134, 3) DWPose whole-body x, y, score (the poses/<stem>.npy layout)."""
        face = np.concatenate([self.face, self.face_scores[..., None]], -1)
        face = np.where(np.isnan(face), 0.0, face)  # a frame without a face: its points scored 0
        return np.concatenate([self.body, self.feet, face, self.hands[:, 0], self.hands[:, 1]], 1)


def _check_size(num_frames: int, height: int, width: int, fps: float) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be at least 16, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")


def _background(kind: str | None, seed: int, scene: bool = False) -> str:
    if kind is None:
        return pick_background(seed, scene=scene)
    if kind not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)} or None, got {kind!r}")
    return kind


def _render(identity: int, motion: Motion, motion_seed, height, width, background, fps) -> Clip:
    person = make_identity(identity)
    pose = pose_keypoints(person, motion, height, width)
    T = len(motion.lean)
    scene_seed = identity * 1_000_003 + (0 if motion_seed is None else motion_seed + 1)
    kind = _background(background, scene_seed)
    scene = render_background(kind, scene_seed, T, height, width, fps)
    frames = np.zeros((T, height, width, 3), np.uint8)
    labels = np.zeros((T, height, width), np.int8)
    body, feet = np.zeros((T, 18, 3)), np.zeros((T, 6, 3))
    hands, face_scores = np.zeros((T, 2, 21, 3)), np.zeros((T, 68))
    for t in range(T):
        image, top, labels[t] = draw_frame(scene[t], person, pose, t)
        frames[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        body[t, :, 2] = point_scores(pose.body[t], top, BODY_OWNERS)
        feet[t, :, 2] = point_scores(pose.feet[t], top, FEET_OWNERS)
        for slot in (0, 1):
            hands[t, slot, :, 2] = point_scores(pose.hands[t, slot], top, [HAND_OWNERS[slot]] * 21)
        face_scores[t] = point_scores(pose.face[t], top, lambda part: part in FACE_HIDERS)
    body[..., :2], feet[..., :2], hands[..., :2] = pose.body, pose.feet, pose.hands
    on_canvas = ((pose.face >= 0) & (pose.face <= np.array([width - 1, height - 1]))).all(-1).any(-1)
    face = np.where(on_canvas[:, None, None], pose.face, np.nan)
    palette = {
        "format": PALETTE_FORMAT,
        "identity": person.seed,
        "motion_seed": motion_seed,
        "limbs": person.limb_colors.tolist(),
        "limb_names": list(PART_NAMES[:17]),
        "limb_width": pose.limb_width,
        "limb_widths": [float(2 * r) for r in limb_radii(pose.limb_width)],
        "skin": person.skin.tolist(),
        "lips": person.lips.tolist(),
        "hair": person.hair.tolist(),
        "shoes": person.shoes.tolist(),
        "clothing": person.clothing.tolist(),
        "pattern": person.pattern,
        "hair_style": person.hair_style,
        "background": kind,
        "height": height,
        "width": width,
        "fps": fps,
        "tolerance": TOLERANCE,
        "limb_shade": list(LIMB_SHADE),
        "max_background_chroma": MAX_BACKGROUND_CHROMA,
    }
    return Clip(
        frames=frames, body=body, hands=hands, face=face, palette=palette, feet=feet,
        face_scores=face_scores, labels=labels, eyes_open=motion.eyes_open, mouth_open=motion.mouth_open,
    )  # fmt: skip


def render_clip(
    identity: int,
    motion_seed: int,
    num_frames: int,
    height: int,
    width: int,
    background: str | None = None,
    *,
    fps: float = DEFAULT_FPS,
) -> Clip:
    """Identity `identity` dancing motion `motion_seed` for `num_frames` frames of height x width at
    `fps`, over `background` (one of BACKGROUNDS; None: picked by the two seeds). Bit-identical for the
    same arguments."""
    _check_size(num_frames, height, width, fps)
    motion = make_motion(motion_seed, num_frames, fps)
    return _render(identity, motion, int(motion_seed), height, width, background, fps)


def render_reference(identity: int, height: int, width: int, background: str | None = None) -> Clip:
    """One frame of the identity standing still (arms a little out, eyes open): a reference image."""
    _check_size(1, height, width, DEFAULT_FPS)
    return _render(identity, rest_motion(1), None, height, width, background, DEFAULT_FPS)


def render_scene(
    seed: int, num_frames: int, height: int, width: int, background: str | None = None, *, fps=DEFAULT_FPS
) -> tuple[np.ndarray, str]:
    """A scene-only clip (no character): (uint8 (T, H, W, 3) frames, its background kind)."""
    _check_size(num_frames, height, width, fps)
    kind = _background(background, check_seed("seed", seed), scene=True)
    frames = render_background(kind, 7_000_000 + int(seed), num_frames, height, width, fps)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), kind


# ------------------------------------------------------------------------------------------------------
# Writing a world
# ------------------------------------------------------------------------------------------------------


def _identity_ids(identities, seed: int) -> list[int]:
    if isinstance(identities, int | np.integer):
        if not 0 <= identities <= IDENTITY_STRIDE:
            raise ValueError(f"identities must be in 0..{IDENTITY_STRIDE}, got {identities}")
        return [seed * IDENTITY_STRIDE + i for i in range(int(identities))]
    ids = [int(i) for i in identities]
    if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
        raise ValueError(f"identities must be distinct non-negative ints, got {ids}")
    return ids


def write_world(
    root: str | Path,
    identities: int | Sequence[int],
    clips_per_identity: int,
    scene_clips: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int = 0,
    *,
    fps: float = DEFAULT_FPS,
    progress: bool = False,
) -> Path:
    """Render a world into `root` (which must not exist) in the layout the module describes.

    identities: how many (ids seed * 10000 + i) or the ids themselves."""
    from tqdm import tqdm

    from xdyna_jax.io.video import write_video

    root = Path(root)
    if os.path.lexists(root):
        raise FileExistsError(f"{root} already exists")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= clips_per_identity <= MOTIONS_PER_IDENTITY or scene_clips < 0:
        raise ValueError(
            f"clips_per_identity must be in 0..{MOTIONS_PER_IDENTITY} and scene_clips >= 0, got "
            f"{clips_per_identity} and {scene_clips}"
        )
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}")
    _check_size(num_frames, height, width, fps)
    ids = _identity_ids(identities, seed)
    jobs = [("reference", i, None) for i in ids]
    jobs += [("clip", i, j) for i in ids for j in range(clips_per_identity)]
    jobs += [("scene", seed * IDENTITY_STRIDE + k, None) for k in range(scene_clips)]

    world = {
        "format": WORLD_FORMAT, "seed": seed, "height": height, "width": width, "num_frames": num_frames,
        "fps": fps, "identities": ids, "clips": [], "scenes": [],
    }  # fmt: skip
    with atomic_folder(root) as tmp:
        folders = {k: tmp / k for k in ("videos", "poses", "faces", "palettes", "scenes", "references")}
        for folder in folders.values():
            folder.mkdir()
        bar = tqdm(jobs, desc="synthetic world", unit="clip", file=sys.stderr, disable=not progress)
        for kind, n, j in bar:
            if kind == "reference":
                clip = render_reference(n, height, width)
                stem = f"id{n:06d}"
                from PIL import Image

                Image.fromarray(clip.frames[0]).save(folders["references"] / f"{stem}.png")
                np.save(folders["references"] / f"{stem}.npy", clip.keypoints()[0].astype(np.float32))
                (folders["references"] / f"{stem}.json").write_text(json.dumps(clip.palette, indent=1))
            elif kind == "clip":
                motion_seed = n * MOTIONS_PER_IDENTITY + j
                clip = render_clip(n, motion_seed, num_frames, height, width, fps=fps)
                stem = f"id{n:06d}_m{j:03d}"
                write_video(folders["videos"] / f"{stem}.mp4", clip.frames, fps=fps)
                np.save(folders["poses"] / f"{stem}.npy", clip.keypoints().astype(np.float32))
                np.save(folders["faces"] / f"{stem}.npy", clip.face.astype(np.float32))
                (folders["palettes"] / f"{stem}.json").write_text(json.dumps(clip.palette, indent=1))
                world["clips"].append(
                    {
                        "stem": stem,
                        "identity": n,
                        "motion_seed": motion_seed,
                        "background": clip.palette["background"],
                    }
                )
            else:
                frames, background = render_scene(n, num_frames, height, width, fps=fps)
                stem = f"scene{n:06d}"
                write_video(folders["scenes"] / f"{stem}.mp4", frames, fps=fps)
                world["scenes"].append({"stem": stem, "seed": n, "background": background})
        (tmp / "world.json").write_text(json.dumps(world, indent=1))
    return root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xdyna_jax.data.synthetic",
        description="Render a synthetic world of dancing characters (videos + exact keypoints + palettes).",
    )
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--identities", type=int, default=8, help="characters (ids seed * 10000 + i)")
    p.add_argument("--clips-per-identity", type=int, default=4)
    p.add_argument("--scenes", type=int, default=4, help="scene-only clips (no character)")
    p.add_argument("--frames", type=int, default=24, help="frames per clip")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--fps", type=float, default=DEFAULT_FPS)
    p.add_argument("--seed", type=int, default=0, help="the world: other seeds give other identities")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = write_world(
            args.out, args.identities, args.clips_per_identity, args.scenes, args.frames, args.height,
            args.width, args.seed, fps=args.fps, progress=True,
        )  # fmt: skip
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
