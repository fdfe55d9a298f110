#!/usr/bin/env python3
"""Generate small, deterministic test videos for cliper's video decoding tests.

What it makes (in tests/fixtures/video/, about 14 files, well under 400 KB in all):

  h264_high_bframes_audio.mp4  H.264 High, B-frames, + AAC audio      30 frames
  hevc.mov                     HEVC (hvc1) in QuickTime                20 frames
  vp9.webm                     VP9 + Opus in WebM                      20 frames
  av1.mkv                      AV1 (libaom) in Matroska                12 frames
  mjpeg.avi                    Motion JPEG in AVI                      20 frames
  prores.mov                   ProRes 422 Proxy in QuickTime            8 frames
  rotated.mp4                  H.264 stored 96x160, display matrix -> shown 160x96
  vfr.mp4                      H.264, 12 frames at irregular exact times
  truncated.mp4                H.264, moov at front, file cut to ~60 %
  truncated.mkv                H.264 in Matroska, file cut to ~60 %
  corrupt_packet.mp4           H.264, one packet's NAL length prefix smashed
  corrupt_packet.avi           MJPEG, one frame's JPEG headers zeroed
  audio_only.m4a               1 s AAC sine, no video
  h264_long_gop.mp4            H.264 High, 120 frames, keyframes at 0/50/100

plus manifest.json describing every file (codec, sizes, rotation, per-frame
times and the frame index read back from each decoded picture).

Every frame shows the pattern described in manifest["_pattern"]: an upright
frame is 160x96 RGB; the top half has 8 blocks of 20x48 that spell the frame
index k in binary (white = 1, MSB left), the bottom half has 8 fixed colour
blocks (red, green, blue, yellow, cyan, magenta, grey, white) that pin down
orientation.

Run it from anywhere (needs python3 and the ffmpeg/ffprobe programs; written
for and checked with Debian 12's FFmpeg 5.1):

    python3 tools/make_video_fixtures.py            # writes tests/fixtures/video/
    python3 tools/make_video_fixtures.py --out DIR  # writes somewhere else

Output is bit-for-bit reproducible with the same FFmpeg/encoder library
versions (bitexact flags, one thread per encoder, no metadata). The script
decodes every file back, checks it, prints a summary and exits non-zero if any
check fails.
"""

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

W, H = 160, 96  # upright (displayed) frame size
BLOCK_W = 20
FPS = 25
BOTTOM_COLOURS = [
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("magenta", (255, 0, 255)),
    ("grey", (128, 128, 128)),
    ("white", (255, 255, 255)),
]
VFR_TIMES_MS = [0, 40, 80, 200, 240, 250, 260, 500, 540, 580, 1000, 1040]
MAX_TOTAL_BYTES = 400 * 1024

FFMPEG = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
# Output-side flags that keep files reproducible.
BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-map_metadata", "-1", "-map_chapters", "-1"]
RAW_IN = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-framerate", str(FPS), "-i", "-"]
X264 = ["-c:v", "libx264", "-threads", "1", "-pix_fmt", "yuv420p"]


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


# --------------------------------------------------------------------------- pattern

def pattern(k):
    """rgb24 bytes of the upright 160x96 pattern for frame index k."""
    top = b"".join((b"\xff\xff\xff" if (k >> (7 - b)) & 1 else b"\x00\x00\x00") * BLOCK_W
                   for b in range(8))
    bottom = b"".join(bytes(c) * BLOCK_W for _, c in BOTTOM_COLOURS)
    return top * (H // 2) + bottom * (H // 2)


def frames_bytes(n, start=0):
    return b"".join(pattern(k) for k in range(start, start + n))


def block_mean(frame, x0, y0, x1, y1):
    s = [0, 0, 0]
    cnt = 0
    for y in range(y0, y1):
        row = frame[(y * W + x0) * 3:(y * W + x1) * 3]
        for c in range(3):
            s[c] += sum(row[c::3])
        cnt += x1 - x0
    return tuple(v / cnt for v in s)


def read_pattern(frame):
    """Return (index or None, bottom_ok) for one decoded upright rgb24 frame."""
    bits = []
    for b in range(8):
        x0 = b * BLOCK_W + 5
        m = block_mean(frame, x0, 10, x0 + 10, 38)
        lum = sum(m) / 3
        spread = max(m) - min(m)
        if lum > 200 and spread < 40:
            bits.append(1)
        elif lum < 55 and spread < 40:
            bits.append(0)
        else:
            bits.append(None)
    bottom_ok = True
    for b, (_, col) in enumerate(BOTTOM_COLOURS):
        x0 = b * BLOCK_W + 5
        m = block_mean(frame, x0, 58, x0 + 10, 86)
        if any(abs(m[c] - col[c]) > 40 for c in range(3)):
            bottom_ok = False
    if None in bits:
        return None, bottom_ok
    return sum(bit << (7 - i) for i, bit in enumerate(bits)), bottom_ok


# --------------------------------------------------------------------------- tools

def run(cmd, stdin=None):
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise CheckFailed("command failed (%d): %s\n%s" % (
            p.returncode, " ".join(cmd), p.stderr.decode(errors="replace")))
    return p.stdout


def ffprobe_json(path, *args):
    out = subprocess.run(["ffprobe", "-v", "quiet", "-of", "json", *args, str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    return json.loads(out or b"{}")


def probe(path):
    return ffprobe_json(path, "-show_format", "-show_streams")


def probe_frames(path):
    return ffprobe_json(path, "-select_streams", "v:0", "-show_frames", "-show_entries",
                        "frame=key_frame,pict_type,pts,pts_time,best_effort_timestamp,"
                        "best_effort_timestamp_time")["frames"]


def probe_packets(path):
    return ffprobe_json(path, "-select_streams", "v:0", "-show_packets", "-show_entries",
                        "packet=pts,dts,pos,size,flags")["packets"]


def decode(path):
    """Decode the first video stream with the ffmpeg CLI (autorotate on) to upright rgb24.

    Returns (frames, stderr_lines)."""
    p = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-i", str(path),
                        "-map", "0:v:0", "-fps_mode", "passthrough", "-enc_time_base", "-1",
                        "-f", "rawvideo",
                        "-pix_fmt", "rgb24", "-"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data = p.stdout
    fsz = W * H * 3
    check(len(data) % fsz == 0, f"{path.name}: decoded {len(data)} bytes, not a multiple "
          f"of {W}x{H}x3 (wrong displayed size?)")
    frames = [data[i:i + fsz] for i in range(0, len(data), fsz)]
    # Drop the context pointers ("[h264 @ 0x55...]") so the manifest is reproducible.
    errs = [re.sub(r" @ 0x[0-9a-f]+\]", "]", l)
            for l in p.stderr.decode(errors="replace").splitlines() if l.strip()]
    return frames, errs


def video_stream(info):
    for s in info.get("streams", []):
        if s["codec_type"] == "video":
            return s
    return None


def rotation_of(stream):
    for sd in stream.get("side_data_list", []):
        if "rotation" in sd:
            return int(sd["rotation"]), sd.get("displaymatrix", "").strip()
    return 0, None


# --------------------------------------------------------------------------- makers

def make_h264_high_bframes_audio(out, tmp):
    run(FFMPEG + RAW_IN + ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=1.2",
                           "-map", "0:v", "-map", "1:a"]
        + X264 + ["-profile:v", "high", "-bf", "3", "-g", "12", "-crf", "30",
                  "-c:a", "aac", "-ac", "1", "-b:a", "16k", "-shortest"]
        + BITEXACT + [str(out)], stdin=frames_bytes(30))
    s = video_stream(probe(out))
    check(s["profile"] == "High", f"profile is {s['profile']}, want High")
    check(int(s["has_b_frames"]) > 0, "has_b_frames is 0")
    return dict(container="mp4", encoded_frames=30,
                notes="H.264 High, -bf 3 -g 12, has_b_frames=%s; AAC 8 kHz mono audio" % s["has_b_frames"])


def make_hevc(out, tmp):
    run(FFMPEG + RAW_IN + ["-c:v", "libx265", "-x265-params",
                           "log-level=error:pools=1:frame-threads=1:keyint=10",
                           "-crf", "30", "-pix_fmt", "yuv420p", "-tag:v", "hvc1", "-f", "mov"]
        + BITEXACT + [str(out)], stdin=frames_bytes(20))
    s = video_stream(probe(out))
    check(s["codec_tag_string"] == "hvc1", f"tag {s['codec_tag_string']}")
    return dict(container="mov", encoded_frames=20, notes="HEVC Main, tag hvc1, keyint 10")


def make_vp9(out, tmp):
    run(FFMPEG + RAW_IN + ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=0.8",
                           "-map", "0:v", "-map", "1:a",
                           "-c:v", "libvpx-vp9", "-threads", "1", "-row-mt", "0", "-deadline", "good",
                           "-cpu-used", "8", "-crf", "40", "-b:v", "0", "-g", "10",
                           "-pix_fmt", "yuv420p",
                           "-c:a", "libopus", "-ac", "1", "-b:a", "12k", "-shortest"]
        + BITEXACT + [str(out)], stdin=frames_bytes(20))
    return dict(container="webm", encoded_frames=20, notes="VP9 profile 0 + Opus mono audio")


def make_av1(out, tmp):
    run(FFMPEG + RAW_IN + ["-c:v", "libaom-av1", "-cpu-used", "8", "-threads", "1", "-row-mt", "0",
                           "-crf", "40", "-b:v", "0", "-g", "12", "-pix_fmt", "yuv420p"]
        + BITEXACT + [str(out)], stdin=frames_bytes(12))
    return dict(container="matroska", encoded_frames=12, notes="AV1 (libaom, cpu-used 8)")


def make_mjpeg(out, tmp, n=20):
    run(FFMPEG + RAW_IN + ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p", "-f", "avi"]
        + BITEXACT + [str(out)], stdin=frames_bytes(n))
    return dict(container="avi", encoded_frames=n, notes="Motion JPEG, yuvj420p (full range)")


def make_prores(out, tmp):
    run(FFMPEG + RAW_IN + ["-c:v", "prores_ks", "-profile:v", "0", "-pix_fmt", "yuv422p10le",
                           "-f", "mov"]
        + BITEXACT + [str(out)], stdin=frames_bytes(8))
    size = out.stat().st_size
    if size > 120 * 1024:
        out.unlink()
        return None
    return dict(container="mov", encoded_frames=8, notes="ProRes 422 Proxy (prores_ks profile 0), 10-bit 4:2:2")


def make_rotated(out, tmp):
    # FFmpeg 5.1 ignores "-metadata:s:v rotate=N" when encoding, but honours it on stream copy
    # (it writes a display matrix). So: encode the pattern turned 90 deg clockwise
    # (stored 96x160), then remux with rotate=90. ffprobe then reports rotation=90
    # (= rotate 90 deg counter-clockwise to display) and ffmpeg's autorotate shows it upright.
    stored = tmp / "rotated_stored.mp4"
    run(FFMPEG + RAW_IN + ["-vf", "transpose=clock"] + X264
        + ["-profile:v", "high", "-crf", "30", "-g", "10", "-sc_threshold", "0"] + BITEXACT + [str(stored)],
        stdin=frames_bytes(20))
    run(FFMPEG + ["-i", str(stored), "-map", "0", "-c", "copy", "-metadata:s:v:0", "rotate=90"]
        + BITEXACT + [str(out)])
    s = video_stream(probe(out))
    if rotation_of(s)[0] != 90:
        # Newer FFmpeg (6.0+) dropped the "rotate" tag hack; it has -display_rotation
        # (counter-clockwise degrees, an input option) instead. Untested here (5.1).
        run(FFMPEG + ["-display_rotation", "90", "-i", str(stored), "-map", "0", "-c", "copy"]
            + BITEXACT + [str(out)])
        s = video_stream(probe(out))
    check((s["width"], s["height"]) == (H, W), f"stored size {s['width']}x{s['height']}")
    rot, _ = rotation_of(s)
    check(rot == 90, f"ffprobe rotation {rot}, want 90")
    return dict(container="mp4", encoded_frames=20,
                notes="Stored 96x160 = upright pattern turned 90 deg clockwise (ffmpeg transpose=clock); "
                      "tkhd display matrix [0 -1; 1 0] written by remuxing with -metadata:s:v:0 rotate=90; "
                      "ffprobe side_data rotation = 90 (counter-clockwise degrees, "
                      "av_display_rotation_get); ffmpeg autorotate applies transpose=cclock and "
                      "shows the upright 160x96 pattern.")


def make_vfr(out, tmp):
    terms = "+".join(f"eq(N\\,{i})*{t}" for i, t in enumerate(VFR_TIMES_MS) if t)
    run(FFMPEG + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-framerate", "1000", "-i", "-",
                  "-vf", f"settb=1/1000,setpts={terms}", "-fps_mode", "passthrough",
                  "-enc_time_base", "1:1000", "-video_track_timescale", "1000"]
        + X264 + ["-profile:v", "high", "-crf", "30", "-bf", "2", "-g", "12"]
        + BITEXACT + [str(out)], stdin=frames_bytes(len(VFR_TIMES_MS)))
    return dict(container="mp4", encoded_frames=len(VFR_TIMES_MS), expect_times_ms=VFR_TIMES_MS,
                notes="Variable frame rate: frame times (ms) %s in a 1/1000 track timescale; "
                      "H.264 High with B-frames" % VFR_TIMES_MS)


def cut(path, frac):
    data = path.read_bytes()
    n = int(len(data) * frac)
    path.write_bytes(data[:n])
    return len(data), n


def make_truncated_mp4(out, tmp):
    run(FFMPEG + RAW_IN + X264 + ["-profile:v", "high", "-bf", "0", "-g", "20", "-crf", "30",
                                  "-movflags", "+faststart"] + BITEXACT + [str(out)],
        stdin=frames_bytes(40))
    full, kept = cut(out, 0.6)
    return dict(container="mp4", encoded_frames=40, truncated_from=full, damaged=True,
                notes=f"40 frames H.264 (no B-frames, -g 20), moov at the front (+faststart), "
                      f"file cut from {full} to {kept} bytes (60 %); the sample table still lists 40 frames")


def make_truncated_mkv(out, tmp):
    run(FFMPEG + RAW_IN + X264 + ["-profile:v", "high", "-bf", "0", "-g", "20", "-crf", "30", "-f", "matroska"]
        + BITEXACT + [str(out)], stdin=frames_bytes(40))
    full, kept = cut(out, 0.6)
    return dict(container="matroska", encoded_frames=40, truncated_from=full, damaged=True,
                notes=f"40 frames H.264 (no B-frames, -g 20) in Matroska, file cut from {full} to "
                      f"{kept} bytes (60 %): no Cues, last cluster incomplete")


def make_corrupt_mp4(out, tmp, bad=15):
    run(FFMPEG + RAW_IN + X264 + ["-profile:v", "high", "-bf", "0", "-g", "30", "-crf", "30"]
        + BITEXACT + [str(out)], stdin=frames_bytes(30))
    pkts = sorted(probe_packets(out), key=lambda p: int(p["pts"]))
    check(len(pkts) == 30, f"{len(pkts)} packets")
    p = pkts[bad]
    pos, size = int(p["pos"]), int(p["size"])
    data = bytearray(out.read_bytes())
    data[pos:pos + 4] = b"\xff\xff\xff\xff"
    out.write_bytes(bytes(data))
    return dict(container="mp4", encoded_frames=30, damaged=True,
                damage=dict(packet=bad, frame_index=bad, pos=pos, size=size,
                            what="first 4 bytes (NAL length prefix) set to FF FF FF FF"),
                notes=f"H.264 -bf 0 -g 30 (one IDR then P-frames); packet {bad} (frame {bad}, "
                      f"file offset {pos}, {size} bytes) has its NAL length prefix overwritten "
                      f"with 0xFFFFFFFF")


def make_corrupt_avi(out, tmp, bad=10):
    make_mjpeg(out, tmp, n=20)
    pkts = sorted(probe_packets(out), key=lambda p: int(p["pts"]))
    check(len(pkts) == 20, f"{len(pkts)} packets")
    p = pkts[bad]
    pos, size = int(p["pos"]), int(p["size"])
    data = bytearray(out.read_bytes())
    # In AVI, the packet pos points at the chunk payload; check it starts with SOI.
    if data[pos:pos + 2] != b"\xff\xd8":
        check(data[pos + 8:pos + 10] == b"\xff\xd8", "no SOI at packet pos")
        pos += 8
    # Zero everything from SOI up to and including the SOS header: no SOI, DQT, DHT,
    # SOF or SOS markers remain, so the decoder finds no picture in this frame.
    sos = data.find(b"\xff\xda", pos, pos + size)
    check(sos > 0, "no SOS marker")
    sos_len = int.from_bytes(data[sos + 2:sos + 4], "big")
    end = sos + 2 + sos_len
    data[pos:end] = bytes(end - pos)
    out.write_bytes(bytes(data))
    return dict(container="avi", encoded_frames=20, damaged=True,
                damage=dict(packet=bad, frame_index=bad, pos=pos, size=size, zeroed_bytes=end - pos,
                            what="JPEG headers zeroed from SOI through the SOS header"),
                notes=f"MJPEG; frame {bad}'s JPEG (file offset {pos}, {size} bytes) has its first "
                      f"{end - pos} bytes (SOI, DQT, DHT, SOF0, SOS headers) zeroed")


def make_audio_only(out, tmp):
    run(FFMPEG + ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=1",
                  "-c:a", "aac", "-ac", "1", "-b:a", "16k", "-f", "ipod"] + BITEXACT + [str(out)])
    info = probe(out)
    check(video_stream(info) is None, "audio_only has a video stream")
    return dict(container="m4a", encoded_frames=0, notes="1 s 440 Hz sine, AAC-LC 8 kHz mono, no video stream")


def make_long_gop(out, tmp):
    run(FFMPEG + RAW_IN + X264 + ["-profile:v", "high", "-bf", "3", "-g", "50", "-keyint_min", "50",
                                  "-sc_threshold", "0", "-crf", "30"] + BITEXACT + [str(out)],
        stdin=frames_bytes(120))
    return dict(container="mp4", encoded_frames=120, expect_keyframes=[0, 50, 100],
                notes="H.264 High, B-frames, GOP 50 (keyframes at frames 0, 50, 100) for seek tests")


FILES = [
    ("h264_high_bframes_audio.mp4", make_h264_high_bframes_audio),
    ("hevc.mov", make_hevc),
    ("vp9.webm", make_vp9),
    ("av1.mkv", make_av1),
    ("mjpeg.avi", make_mjpeg),
    ("prores.mov", make_prores),
    ("rotated.mp4", make_rotated),
    ("vfr.mp4", make_vfr),
    ("truncated.mp4", make_truncated_mp4),
    ("truncated.mkv", make_truncated_mkv),
    ("corrupt_packet.mp4", make_corrupt_mp4),
    ("corrupt_packet.avi", make_corrupt_avi),
    ("audio_only.m4a", make_audio_only),
    ("h264_long_gop.mp4", make_long_gop),
]


# --------------------------------------------------------------------------- describe/check

def describe(path, meta):
    info = probe(path)
    fmt = info.get("format", {})
    streams = info.get("streams", [])
    audio = [s for s in streams if s["codec_type"] == "audio"]
    entry = dict(
        container=meta["container"],
        format_name=fmt.get("format_name"),
        bytes=path.stat().st_size,
        has_audio=bool(audio),
    )
    if audio:
        a = audio[0]
        entry["audio"] = dict(codec=a["codec_name"], sample_rate=int(a["sample_rate"]),
                              channels=a["channels"])
    v = video_stream(info)
    if v is None:
        entry.update(codec=None, frames=0, width=None, height=None, stored_width=None,
                     stored_height=None, rotation=0, times=[], indices=[],
                     duration=float(fmt["duration"]) if "duration" in fmt else None,
                     notes=meta["notes"])
        return entry

    rot, matrix = rotation_of(v)
    sw, sh = v["width"], v["height"]
    dw, dh = (sh, sw) if rot % 180 else (sw, sh)
    check((dw, dh) == (W, H), f"{path.name}: displayed size {dw}x{dh}")
    start = float(v.get("start_time", 0) or 0)

    frames, errs = decode(path)
    read = [read_pattern(f) for f in frames]
    indices = [i for i, _ in read]
    bottom_ok = [ok for _, ok in read]

    pf = probe_frames(path)
    times = []
    for f in pf:
        t = f.get("best_effort_timestamp_time")
        times.append(round(float(t) - start, 6) if t is not None else None)
    keyframes = [i for i, f in enumerate(pf) if int(f.get("key_frame", 0))]

    entry.update(
        codec=v["codec_name"],
        profile=v.get("profile"),
        pix_fmt=v.get("pix_fmt"),
        codec_tag=v.get("codec_tag_string"),
        frames=len(frames),
        encoded_frames=meta["encoded_frames"],
        container_frames=int(v["nb_frames"]) if str(v.get("nb_frames", "")).isdigit() else None,
        width=dw, height=dh, stored_width=sw, stored_height=sh,
        rotation=rot,
        fps=v.get("r_frame_rate"), avg_frame_rate=v.get("avg_frame_rate"),
        time_base=v.get("time_base"),
        start_time=start,
        has_b_frames=int(v.get("has_b_frames", 0)),
        times_source="ffprobe -show_frames best_effort_timestamp_time minus the video stream's start_time",
        times=times,
        keyframes=keyframes,
        indices=indices,
        bottom_colours_ok=all(bottom_ok),
        notes=meta["notes"],
    )
    if matrix:
        entry["display_matrix"] = matrix
    if len(pf) != len(frames):
        entry["ffprobe_frames"] = len(pf)
    if errs:
        entry["ffmpeg_errors"] = errs[:6] + ([f"... {len(errs) - 6} more lines"] if len(errs) > 6 else [])
    for k in ("damage", "truncated_from"):
        if k in meta:
            entry[k] = meta[k]

    n = meta["encoded_frames"]
    name = path.name
    if not meta.get("damaged"):
        check(len(frames) == n, f"{name}: decoded {len(frames)} frames, want {n}")
        check(indices == list(range(n)), f"{name}: indices {indices}")
        check(all(bottom_ok), f"{name}: bottom colour row wrong (orientation?) in frames "
              f"{[i for i, ok in enumerate(bottom_ok) if not ok]}")
        check(len(times) == n, f"{name}: ffprobe gave {len(times)} frames")
        check(all(b > a for a, b in zip(times, times[1:])), f"{name}: times not increasing {times}")
        if "expect_times_ms" in meta:
            want = [t / 1000 for t in meta["expect_times_ms"]]
            check(times == want, f"{name}: times {times}, want {want}")
        else:
            want = [round(k / FPS, 6) for k in range(n)]
            check(times == want, f"{name}: times {times}, want {want}")
        if "expect_keyframes" in meta:
            check(keyframes == meta["expect_keyframes"], f"{name}: keyframes {keyframes}")
    return entry


def check_damaged(name, entry):
    """Checks and notes for the damaged files; the facts were found with FFmpeg 5.1."""
    idx = entry["indices"]
    n = entry["frames"]
    if name.startswith("truncated"):
        check(0 < n < entry["encoded_frames"], f"{name}: decoded {n} frames")
        # The last, partly present packet may come out half-concealed; every frame before
        # it must be intact and in order.
        check(idx[:n - 1] == list(range(n - 1)), f"{name}: indices {idx}")
        clean = n if idx[n - 1] == n - 1 else n - 1
        entry["intact_frames"] = clean
        entry["notes"] += (f". FFmpeg 5.1 decodes {n} frames, indices {idx[0]}..{idx[-1]} "
                           f"in order" + ("" if clean == n else
                                          " (the last one unreadable: cut mid-packet)"))
    elif name == "corrupt_packet.mp4":
        bad = entry["damage"]["frame_index"]
        check(idx[:bad] == list(range(bad)), f"{name}: frames before the damage: {idx[:bad]}")
        check(bad not in idx, f"{name}: damaged frame {bad} still decoded")
        entry["notes"] += (f". FFmpeg 5.1 rejects packet {bad} and decodes {n} frames; "
                           f"indices read back: {idx} (null = pattern unreadable; later P-frames "
                           f"predict from a concealed reference)")
    elif name == "corrupt_packet.avi":
        bad = entry["damage"]["frame_index"]
        want = [k for k in range(entry["encoded_frames"]) if k != bad]
        check(idx == want, f"{name}: indices {idx}, want {want}")
        entry["notes"] += f". FFmpeg 5.1 drops frame {bad} and decodes {n} frames ({want[0]}..{want[-1]} without {bad})"


PATTERN_DOC = dict(
    description="Upright frame 160x96 RGB. Top half (y 0..47): 8 blocks of 20x48 px; block b "
                "(b=0..7, left to right) is white (255,255,255) if bit (7-b) of the frame index k is "
                "set (MSB first), else black (0,0,0). Bottom half (y 48..95): 8 blocks of 20x48 in "
                "fixed colours left to right. Frames are numbered k = 0,1,2,... in presentation order.",
    width=W, height=H, block_width=BLOCK_W, block_height=H // 2,
    bottom_colours=[dict(name=n, rgb=list(c)) for n, c in BOTTOM_COLOURS],
    how_read_back="decoded with the ffmpeg CLI (autorotate on) to rgb24; mean of a 10x28 px patch in "
                  "each block's centre; top blocks: white if mean > 200, black if < 55, else "
                  "unreadable (index null); bottom blocks must be within 40 of their colour",
    generator="tools/make_video_fixtures.py",
)


def make_rotated_face(out_dir, tmp):
    """A portrait phone clip of a face, stored sideways (as phones store
    portrait video) with the display matrix of an iPhone (rotation -90: turn
    90 deg clockwise to show). Made from tests/data/astronaut.png; the
    frontal face detector only finds the face when the rotation is applied."""
    src = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut.png"
    stored = tmp / "rotated_face_stored.mp4"
    out = out_dir / "rotated_face.mp4"
    run(FFMPEG + ["-loop", "1", "-framerate", "25", "-i", str(src), "-frames:v", "10",
                  "-vf", "scale=320:320,crop=240:320,transpose=cclock"] + X264
        + ["-profile:v", "high", "-crf", "28", "-g", "10"] + BITEXACT + [str(stored)])
    run(FFMPEG + ["-i", str(stored), "-map", "0", "-c", "copy", "-metadata:s:v:0", "rotate=270"]
        + BITEXACT + [str(out)])
    s = video_stream(probe(out))
    check((s["width"], s["height"]) == (320, 240), f"stored size {s['width']}x{s['height']}")
    rot, _ = rotation_of(s)
    check(rot == -90, f"ffprobe rotation {rot}, want -90")
    print(f"{out.name:30s} {out.stat().st_size:7d} B  h264  10 frames  240x320 shown, rotation -90")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "video")
    args = ap.parse_args()
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    decoders = run(["ffmpeg", "-hide_banner", "-decoders"]).decode()
    check(any(n in decoders for n in (" libdav1d ", " libaom-av1 ")), "ffmpeg has no AV1 decoder")
    versions = run(["ffmpeg", "-hide_banner", "-version"]).decode().splitlines()[0]

    manifest = {"_pattern": PATTERN_DOC,
                "_generated_with": versions.split(" Copyright")[0]}
    failures = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name, maker in FILES:
            path = out_dir / name
            if path.exists():
                path.unlink()
            try:
                meta = maker(path, tmp)
                if meta is None:
                    print(f"SKIP {name}: too large", file=sys.stderr)
                    continue
                entry = describe(path, meta)
                if meta.get("damaged"):
                    check_damaged(name, entry)
            except CheckFailed as e:
                failures.append(f"{name}: {e}")
                print(f"FAIL {name}: {e}", file=sys.stderr)
                continue
            manifest[name] = entry
            sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{name:30s} {entry['bytes']:7d} B  {entry['codec'] or '-':6s} "
                  f"{entry['frames']:3d} frames  {entry['width'] or '-'}x{entry['height'] or '-'} "
                  f"rot {entry['rotation']:3d}  audio {'y' if entry['has_audio'] else 'n'}  sha {sha}")

        try:
            make_rotated_face(out_dir, tmp)
        except CheckFailed as e:
            failures.append(f"rotated_face.mp4: {e}")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(e["bytes"] for k, e in manifest.items() if not k.startswith("_"))
    print(f"total {total} bytes in {len(manifest) - 2} files; manifest: {out_dir / 'manifest.json'}")
    if total > MAX_TOTAL_BYTES:
        failures.append(f"total size {total} > {MAX_TOTAL_BYTES}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
