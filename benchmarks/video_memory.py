"""Video decoding memory: peak RSS and time of the video processor against the clip's length.

Synthetic 1920x1080 clips of the given durations are written with PyAV (codec `--codec`, default mpeg4 at
`--bitrate` 2 Mbit/s, `--fps` 30 frames per second): 60 distinct frames (a gradient with a moving bar, converted to
yuv420p once) repeated, so the 10-minute clip is quick to write. Then, per clip, a subprocess runs

* `new`: `VideoProcessor()(path)`: this package's loader (frame indices from the stream's metadata, only the
  sampled frames kept, each resized as it comes; it seeks to the keyframe before each sampled frame when the
  samples are sparse enough, else decodes front to back), then normalise and patchify;
* `seq`: the same with seeking switched off (always front to back), to measure what seeking brings;
* `old`: the loader as it was before issue 10, re-implemented here (`load_video_decode_all`: decode every frame at
  full size to RGB, `np.stack`, and only then sample), followed by the same processor on the (frames, metadata)
  array path, which samples and resizes exactly as before. It runs under an address-space cap (`--old-cap-gb`,
  RLIMIT_AS) so that it fails with MemoryError instead of taking the machine down; the table then shows the peak
  it reached and what decoding everything would need (frames x 1920 x 1080 x 3 bytes, twice: list + stack);
* `floor`: only the imports (the part of the RSS that is not video).

Peak RSS is the child's own `ru_maxrss` (os.wait4); time is the child's wall time for the processing call. The
processor uses transformers' class defaults (fps 2, max_duration 300 s, max_pixels 28*28*2*30000). When both
variants finish, their outputs are compared (SHA-256 of pixel_values_videos and the frame indices).

    python benchmarks/video_memory.py --durations 10 60 600 --workdir /tmp/vidbench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import av
import numpy as np
from common import print_table

from glm41v_jax.processing import VideoMetadata, VideoProcessor, video_decode

W, H = 1920, 1080
N_DISTINCT = 60


def write_clip(path: str, seconds: float, fps: int, codec: str, bitrate: int) -> int:
    """A 1080p clip of `seconds` at `fps` (N_DISTINCT distinct frames, repeated). Returns the frame count."""
    yy, xx = np.mgrid[0:H, 0:W]
    base = []
    for k in range(N_DISTINCT):
        rgb = np.empty((H, W, 3), np.uint8)
        rgb[..., 0] = (xx // 4 + 3 * k) % 256
        rgb[..., 1] = (yy // 3) % 256
        rgb[..., 2] = 40
        x0 = (k * W) // N_DISTINCT
        rgb[:, x0:x0 + 64] = 255  # a white bar crossing the picture
        base.append(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
    n = int(round(seconds * fps))
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.bit_rate = bitrate
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        for i in range(n):
            f = base[i % N_DISTINCT]
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return n


def load_video_decode_all(path: str):
    """The pre-issue-10 loader: every frame decoded to full-size RGB and stacked; sampling happens afterwards."""
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
    fps = float(rate)
    n = len(frames)
    h, w = frames[0].shape[:2]
    return np.stack(frames), VideoMetadata(total_num_frames=n, fps=fps, duration=n / fps, width=w, height=h)


def child(mode: str, path: str) -> None:
    if mode == "floor":
        print(json.dumps({"seconds": 0.0}))
        return
    if mode == "seq":
        video_decode._Packets.seek_plan = lambda *a: None
    vp = VideoProcessor()
    t0 = time.perf_counter()
    try:
        if mode in ("new", "seq"):
            out = vp(path)
        else:
            frames, meta = load_video_decode_all(path)
            out = vp((frames, meta))
            del frames
    except MemoryError:
        print(json.dumps({"error": "MemoryError", "seconds": time.perf_counter() - t0}))
        sys.exit(3)
    dt = time.perf_counter() - t0
    md = out["video_metadata"][0]
    h = hashlib.sha256(out["pixel_values_videos"].reshape(-1).view(np.uint8))  # no copy
    h.update(np.asarray(md.frames_indices, np.int64).tobytes())
    print(json.dumps({"seconds": dt, "kept": len(md.frames_indices), "total": md.total_num_frames,
                      "grid": out["video_grid_thw"][0].tolist(), "sha": h.hexdigest()[:16]}))


def run_child(mode: str, path: str, cap_gb: float | None) -> tuple[dict, float, int]:
    """(child's JSON line, peak RSS GiB, exit code)."""

    def limit() -> None:
        if cap_gb:
            cap = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", mode, path],
                            stdout=subprocess.PIPE, env=env, preexec_fn=limit)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    info = json.loads(lines[-1]) if lines else {"error": f"exit code {rc}"}
    return info, usage.ru_maxrss / 2**20, rc  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durations", type=float, nargs="+", default=[10, 60, 600], help="clip lengths in seconds")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--codec", default="mpeg4")
    ap.add_argument("--bitrate", type=int, default=2_000_000)
    ap.add_argument("--old-cap-gb", type=float, default=8.0, help="address-space cap of the old-approach child")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--workdir", default="/tmp/vidbench")
    ap.add_argument("--keep", action="store_true", help="keep the generated clips")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    os.makedirs(args.workdir, exist_ok=True)
    floor, floor_rss, _ = run_child("floor", "-", None)
    rows = []
    try:
        for secs in args.durations:
            path = os.path.join(args.workdir, f"clip_{secs:g}s.mp4")
            t0 = time.perf_counter()
            n = write_clip(path, secs, args.fps, args.codec, args.bitrate)
            gen_s = time.perf_counter() - t0
            mb = os.path.getsize(path) / 1e6
            print(f"[{secs:g} s: {n} frames, {mb:.1f} MB written in {gen_s:.1f} s]", file=sys.stderr, flush=True)
            new, new_rss, rc = run_child("new", path, None)
            if rc:
                raise SystemExit(f"new loader failed on {path}: {new}")
            seq, seq_rss, rc = run_child("seq", path, None)
            if rc or seq["sha"] != new["sha"]:
                raise SystemExit(f"front-to-back loader failed or differs on {path}: {seq}")
            if args.skip_old:
                old, old_rss = {"error": "skipped"}, float("nan")
            else:
                old, old_rss, _ = run_child("old", path, args.old_cap_gb)
            need = 2 * n * W * H * 3 / 2**30
            if args.skip_old:
                old_txt, old_s, same = "skipped", "-", "-"
            elif "error" in old:
                old_txt = f">= {old_rss:.2f} ({old['error']} at the {args.old_cap_gb:g} GiB cap; needs ~{need:.0f})"
                old_s, same = "-", "-"
            else:
                old_txt, old_s = f"{old_rss:.2f}", f"{old['seconds']:.1f}"
                same = "yes" if old["sha"] == new["sha"] else "NO"
            rows.append(dict(secs=f"{secs:g}", n=n, mb=mb, kept=new["kept"], grid="x".join(map(str, new["grid"])),
                             new_rss=new_rss, new_s=new["seconds"], seq_rss=seq_rss, seq_s=seq["seconds"],
                             old_rss=old_txt, old_s=old_s, same=same,
                             ratio=(f"{old_rss / new_rss:.1f}x" if "error" not in old else "-")))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"\nimports only (floor): peak RSS {floor_rss:.2f} GiB; clips 1920x1080 {args.codec} "
          f"{args.bitrate / 1e6:g} Mbit/s at {args.fps} fps\n")
    print_table([("clip s", "{secs}"), ("frames", "{n}"), ("MB", "{mb:.1f}"), ("kept", "{kept}"),
                 ("grid t x h x w", "{grid}"), ("new peak RSS GiB", "{new_rss:.2f}"), ("new s", "{new_s:.1f}"),
                 ("no-seek peak RSS GiB", "{seq_rss:.2f}"), ("no-seek s", "{seq_s:.1f}"),
                 ("old peak RSS GiB", "{old_rss}"), ("old s", "{old_s}"), ("old/new RSS", "{ratio}"),
                 ("same output", "{same}")], rows)


if __name__ == "__main__":
    main()
