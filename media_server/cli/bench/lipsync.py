"""``facecast bench lipsync``: frames/s of the Wav2Lip generator per backend and batch size, for one stream.

Every backend runs the per-frame work of a live stream (audio encoder + decoder; the face features are
computed once per avatar frame and cached, as the engine does) on real inputs: crops of the default
avatar's face and the mel windows of espeak-ng speech. Backends are timed side by side, round-robin
within each batch size, so a change in machine load hits all of them alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engines.avatar import load_avatar
from engines.enhancer.gfpgan.model import GFPGAN
from engines.lipsync.wav2lip.backends import Wav2LipBackend, create_backend
from engines.lipsync.wav2lip.calibration import face_inputs, jittered_face_crops, speech_mel_windows
from engines.lipsync.wav2lip.model import Wav2LipGenerator, deterministic_state_dict, load_checkpoint
from media_server.config import PROJECT_ROOT, Settings
from media_server.testing.speech_corpus import espeak_16k

BACKENDS = ("torch", "onnx", "onnx-int8")
REFERENCE = "torch"  # eager float32 PyTorch
BATCH_SIZES = (1, 4, 8, 16)
REAL_TIME_FPS = 25
TARGET_RATIO = 2.5
MIN_ROUNDS = 3
AVATAR_CROPS = 8
CONFORMANCE_WEIGHTS = PROJECT_ROOT / "tests" / "fixtures" / "wav2lip" / "wav2lip_state_dict.json"
SPEECH = (
    ("What is the capital of France? Paris is the capital of France.", "en-us", 160),
    ("How many legs does a spider have? A spider has eight legs.", "en-gb", 140),
    ("Why do leaves change color in autumn? The days get shorter and colder.", "en-us", 185),
)


@dataclass(frozen=True)
class Cell:
    backend: str
    batch: int
    fps: float  # median over rounds
    ms_per_call: float
    rounds: int
    ratio_to_torch: float  # against eager float32 PyTorch at the same batch size


def _load_average() -> list[float]:
    return [float(field) for field in Path("/proc/loadavg").read_text().split()[:3]]


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) since boot."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / ticks, own.user + own.system


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model(options: dict[str, object]) -> tuple[Wav2LipGenerator, str]:
    from engines.lipsync.wav2lip.engine import DEFAULT_CHECKPOINT

    checkpoint = Path(str(options.get("checkpoint") or DEFAULT_CHECKPOINT)).expanduser()
    if checkpoint.is_file():
        return load_checkpoint(checkpoint), f"checkpoint {checkpoint}"
    model = Wav2LipGenerator()
    model.load_state_dict(deterministic_state_dict(CONFORMANCE_WEIGHTS))
    # Speed does not depend on the weights' values; int8 PSNR does, so it is only indicative without a checkpoint.
    return model.eval(), f"deterministic conformance weights ({checkpoint} not found): int8 PSNR indicative only"


def _faces(settings: Settings) -> np.ndarray:
    avatar = load_avatar(settings.server.avatars_dir / settings.server.default_avatar)
    crops = jittered_face_crops(avatar.frames[0], avatar.face_boxes[0], AVATAR_CROPS, seed=1)  # not calibration's
    return face_inputs(crops)


def _time_round(
    backends: dict[str, Wav2LipBackend], features: dict[str, object], mels: np.ndarray, index: np.ndarray
) -> dict[str, float]:
    seconds = {}
    for name, backend in backends.items():
        start = time.perf_counter()
        backend.generate(mels, features[name], index)
        seconds[name] = time.perf_counter() - start
    return seconds


def _measure_batch(
    backends: dict[str, Wav2LipBackend], features: dict[str, object], mels: np.ndarray, batch: int, budget_s: float
) -> dict[str, list[float]]:
    """Seconds per call of each backend, in rounds, until every backend has had about ``budget_s``."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    offset, started = 0, time.monotonic()
    _time_round(backends, features, mels[:batch], np.arange(batch) % AVATAR_CROPS)  # warm-up
    while len(times[REFERENCE]) < MIN_ROUNDS or time.monotonic() - started < budget_s * len(backends):
        frames = (offset + np.arange(batch)) % len(mels)  # consecutive frames of the speech, as a stream has
        for name, seconds in _time_round(backends, features, mels[frames], frames % AVATAR_CROPS).items():
            times[name].append(seconds)
        offset += batch
    return times


def _cells(times: dict[int, dict[str, list[float]]]) -> list[Cell]:
    cells = []
    for batch, per_backend in times.items():
        reference = batch / statistics.median(per_backend[REFERENCE])
        for name, seconds in per_backend.items():
            median = statistics.median(seconds)
            cells.append(Cell(name, batch, batch / median, 1000 * median, len(seconds), batch / median / reference))
    return cells


def _psnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((reference.astype(np.float64) - other) ** 2)))


def _int8_psnr(backends: dict[str, Wav2LipBackend], features: dict[str, object], mels: np.ndarray) -> float:
    index = np.arange(len(mels)) % AVATAR_CROPS
    outputs = {
        name: np.concatenate(
            [
                backends[name].generate(mels[i : i + 16], features[name], index[i : i + 16])
                for i in range(0, len(mels), 16)
            ]
        )
        for name in ("onnx", "onnx-int8")
    }
    return _psnr_db(outputs["onnx"], outputs["onnx-int8"])


def _gfpgan_ms_per_face(repeats: int = 3) -> float:
    """Median time of the GFPGAN v1.4 enhancer on one 512x512 face: the cost is the architecture's,
    whatever the weight values, so torch's initialisation stands in for the downloadable weights."""
    model = GFPGAN().eval()
    face = torch.zeros(1, 3, 512, 512)
    timings = []
    with torch.inference_mode():
        model(face)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(face)
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def run(settings: Settings, seconds: float) -> dict[str, object]:
    load_at_start = _load_average()
    options = settings.lipsync.options
    threads = int(options.get("threads", 2))
    torch.set_num_threads(threads)
    model, weights = _model(options)
    faces, mels = _faces(settings), speech_mel_windows(espeak_16k(SPEECH))
    backends = {name: create_backend(name, model, "cpu", threads=threads) for name in BACKENDS}
    features = {name: backend.encode_faces(faces) for name, backend in backends.items()}
    cpu_before, started = _cpu_seconds(), time.monotonic()
    times = {batch: _measure_batch(backends, features, mels, batch, seconds) for batch in BATCH_SIZES}
    cpu_after, elapsed = _cpu_seconds(), time.monotonic() - started
    others = ((cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / elapsed
    cells = _cells(times)
    best = max(cells, key=lambda cell: cell.fps)
    torch_best = max((cell for cell in cells if cell.backend == REFERENCE), key=lambda cell: cell.fps)
    feature_bytes = sum(array[0].nbytes for array in features["onnx"])
    return {
        "weights": weights,
        "runtimes": {
            name: str(backend.describe().get("runtime", f"torch {torch.__version__} eager"))
            for name, backend in backends.items()
        },
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "other_processes_cores_during_timing": others,
        "speech_frames": len(mels),
        "cells": [asdict(cell) for cell in cells],
        "best": asdict(best),
        "best_ratio_to_torch_best": best.fps / torch_best.fps,
        "torch_best": asdict(torch_best),
        "target_ratio": TARGET_RATIO,
        "target_met": best.fps / torch_best.fps >= TARGET_RATIO,
        "first_frame_ms": {cell.backend: cell.ms_per_call for cell in cells if cell.batch == 1},
        "int8_psnr_db": _int8_psnr(backends, features, mels),
        "face_features_bytes_per_avatar_frame": feature_bytes,
        "sessions_at_25_fps": int(best.fps // REAL_TIME_FPS),
        "gfpgan_ms_per_face": _gfpgan_ms_per_face(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _print_table(summary: dict[str, object]) -> None:
    cells = [Cell(**cell) for cell in summary["cells"]]
    header = f"{'batch':>5}" + "".join(f"{name:>24}" for name in BACKENDS)
    print("Wav2Lip generator, one stream: frames/s (ratio to eager float32 PyTorch at the same batch)")
    print(f"weights: {summary['weights']}")
    print("runtimes: " + ", ".join(f"{name} = {runtime}" for name, runtime in summary["runtimes"].items()))
    print(
        f"threads: {summary['threads']} of {summary['cpu_count']} cores; load average at start "
        f"{summary['load_average_at_start']}; other processes used "
        f"{summary['other_processes_cores_during_timing']:.2f} cores on average while timing"
    )
    print(header)
    for batch in BATCH_SIZES:
        row = {cell.backend: cell for cell in cells if cell.batch == batch}
        print(
            f"{batch:>5}" + "".join(f"{row[name].fps:>14.1f} ({row[name].ratio_to_torch:4.2f}x)" for name in BACKENDS)
        )
    best, torch_best = Cell(**summary["best"]), Cell(**summary["torch_best"])
    verdict = "met" if summary["target_met"] else "NOT met"
    print(
        f"best: {best.backend} at batch {best.batch}: {best.fps:.1f} frames/s = "
        f"{summary['best_ratio_to_torch_best']:.2f}x eager float32's best ({torch_best.fps:.1f} at batch "
        f"{torch_best.batch}); target {TARGET_RATIO}x {verdict}"
    )
    print(
        "generator time of a reply's first frame (batch 1): "
        + ", ".join(f"{name} {ms:.0f} ms" for name, ms in summary["first_frame_ms"].items())
    )
    print(f"int8 vs float32 output on {summary['speech_frames']} speech frames: PSNR {summary['int8_psnr_db']:.1f} dB")
    per_frame = summary["face_features_bytes_per_avatar_frame"]
    print(
        f"avatar cache: {per_frame / 2**20:.2f} MiB of face features per avatar frame "
        f"(a photo: 1 frame; a 10 s video loop at 25 fps: {250 * per_frame / 2**20:.0f} MiB)"
    )
    print(
        f"sessions speaking at once at {REAL_TIME_FPS} fps: {summary['sessions_at_25_fps']} "
        f"(best frames/s / {REAL_TIME_FPS}, with nothing else running)"
    )
    gfpgan_ms = summary["gfpgan_ms_per_face"]
    print(
        f"GFPGAN v1.4 face enhancer, one 512x512 face (torch eager, {summary['threads']} threads): "
        f"{gfpgan_ms:.0f} ms median of 3, {1000 / gfpgan_ms:.2f} faces/s"
    )
    print(f"peak process memory: {summary['peak_rss_mb']:.0f} MB (three backends loaded)")


def main(args: argparse.Namespace, settings: Settings) -> None:
    summary = run(settings, args.seconds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_table(summary)
