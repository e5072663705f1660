"""The README's main job runs end to end (small size)."""
import subprocess
import sys


def test_demo_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "zbigarray.demo", "--mib", "8", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "content verified" in r.stdout
    assert "'ZBlk1': 1" in r.stdout          # the small in-place change used the chunked format
