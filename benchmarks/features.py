"""Feature and label speed on 60 s of audio: ours against the nearest librosa computation.

Run: python benchmarks/features.py [--seconds 60] [--skip-full]
"""
from __future__ import annotations

import argparse
import time

import librosa
import numpy as np
import torch

from diffcraft.audio.crepe import crepe_pitch
from diffcraft.audio.features import N_FFT, WIN_LENGTH, a_weighted_loudness, log_magnitude_stft, pccc
from diffcraft.data.synthetic import render_phrase


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def librosa_loudness(y):
    power = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=160, win_length=WIN_LENGTH)) ** 2
    weights = librosa.db_to_power(librosa.A_weighting(librosa.fft_frequencies(sr=16000, n_fft=N_FFT)))
    return librosa.power_to_db((power * weights[:, None]).mean(0))


def librosa_piano_cqt(y):
    return np.log(np.abs(librosa.cqt(y, sr=16000, hop_length=160, fmin=27.5, n_bins=88)) + 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-full", action="store_true", help="skip CREPE full (~3x slower than real time)")
    args = parser.parse_args()
    audio = render_phrase(0, args.seconds, sample_rate=16000).audio
    tensor = torch.from_numpy(audio)
    print(f"{args.seconds:.0f} s of audio, torch threads {torch.get_num_threads()}")
    rows = [
        ("loudness (A-weighted dB)", lambda: a_weighted_loudness(tensor), lambda: librosa_loudness(audio)),
        ("log-magnitude STFT", lambda: log_magnitude_stft(tensor),
         lambda: np.log(np.abs(librosa.stft(audio, n_fft=N_FFT, hop_length=160, win_length=WIN_LENGTH)) + 1e-5)),
        ("PCCC (vs librosa 88-key CQT)", lambda: pccc(tensor), lambda: librosa_piano_cqt(audio)),
    ]
    print(f"{'feature':32s} {'diffcraft s':>12s} {'librosa s':>10s} {'speed-up':>9s}")
    for name, ours, theirs in rows:
        a, b = best_of(ours), best_of(theirs)
        print(f"{name:32s} {a:12.3f} {b:10.3f} {b / a:8.1f}x")
    for model in ["tiny"] + ([] if args.skip_full else ["full"]):
        seconds = best_of(lambda: crepe_pitch(audio, model, progress=False), repeats=1)
        print(f"CREPE {model:4s}: {seconds:.1f} s for {args.seconds:.0f} s of audio = "
              f"{seconds / args.seconds:.3f} s per audio second")


if __name__ == "__main__":
    main()
