import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffcraft.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_error_names_the_problem_without_traceback(tmp_path):
    out = run_cli("data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "cache"))
    assert out.returncode == 2
    assert "missing: no such folder" in out.stderr and "Traceback" not in out.stderr


def test_cli_synth_writes_mdb_layout(tmp_path):
    out = run_cli("data", "synth", "--out", str(tmp_path / "s"), "--songs", "1", "--stems", "2",
                  "--seconds", "2")
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "s" / "audio_stems").glob("*.RESYN.wav"))) == 2
    assert len(list((tmp_path / "s" / "annotation_stems").glob("*.RESYN.csv"))) == 2
