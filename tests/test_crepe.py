import subprocess
import sys

import numpy as np
import pytest

from diffcraft.audio.crepe import crepe_pitch
from diffcraft.pitch import hz_to_cents
from tests.conftest import sine


@pytest.mark.parametrize("model", ["tiny", "full"])
def test_crepe_within_50_cents_on_a_synthetic_tone(model):
    tone = sine(311.13, 1.0, 0.4) + sine(622.26, 1.0, 0.2)
    f0, periodicity = crepe_pitch(tone, model, progress=False)
    assert f0.shape == (100,) and periodicity.shape == (100,)
    error = np.abs(hz_to_cents(f0[5:95]) - hz_to_cents(311.13))
    assert np.median(error) < 50 and error.max() < 50
    assert np.median(periodicity[5:95]) > 0.5


def test_crepe_labels_are_deterministic_and_400_frames_per_clip():
    clip = sine(440, 4.0)
    first, _ = crepe_pitch(clip, "tiny", progress=False)
    second, _ = crepe_pitch(clip, "tiny", progress=False)
    assert first.shape == (400,)
    assert np.array_equal(first, second)


def test_torchcrepe_imports_with_unloadable_torchaudio():
    """With torchaudio broken (as PyPI's CUDA wheel is beside CPU torch), the stand-in is used."""
    code = (
        "import sys, types\n"
        "class Broken(types.ModuleType):\n"
        "    def __getattr__(self, n): raise OSError('libc10_cuda.so: cannot open shared object file')\n"
        "import importlib.abc\n"
        "class Finder(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torchaudio': raise OSError('libc10_cuda.so: cannot open shared object file')\n"
        "sys.meta_path.insert(0, Finder())\n"
        "import diffcraft\n"
        "from diffcraft.audio.crepe import load_torchcrepe\n"
        "tc = load_torchcrepe()\n"
        "import torchaudio\n"
        "try:\n"
        "    torchaudio.load\n"
        "except ImportError as e:\n"
        "    print('STANDIN', 'libc10_cuda' in str(e))\n"
        "print('CREPE', hasattr(tc, 'predict'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "STANDIN True" in out.stdout and "CREPE True" in out.stdout
