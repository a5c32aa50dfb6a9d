"""The README's main job (examples/demo.py) runs and prints what it promises."""
import os
import subprocess
import sys

import conftest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not conftest.BACKEND_INSTALLED, reason="package not pip-installed (the demo names the backend)")
def test_demo_tiny_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--tiny"],
                            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "4 attention site(s): 2 sparse, 2 dense" in out
    assert "(8, 16, 16)" in out
    assert "output error vs dense at sparsity 0.875" in out and "speedup" in out


def run_example(*argv) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", *argv[:1]), *argv[1:]],
                            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(not conftest.BACKEND_INSTALLED, reason="package not pip-installed (the example names the backend)")
def test_wan_t2v_tiny_runs():
    pytest.importorskip("diffusers")
    # 128-token tiles (joint_attention's test runs the default tile through the same compare()).
    out = run_example("wan_t2v.py", "--tiny", "--steps", "3", "--tile", "4", "4", "8")
    assert "4 attention site(s): 2 sparse, 2 dense" in out and "(5, 8, 8)" in out
    assert "at sparsity 0.875, tile (4, 4, 8):" in out, out
    assert "denoising step: inductor" in out and "speedup" in out
    # The dense warm-up: step 0 at sparsity 0, the rest at 0.875.
    assert "step 0: sparsity 0.0 " in out and "step 2: sparsity 0.875" in out


@pytest.mark.skipif(not conftest.BACKEND_INSTALLED, reason="package not pip-installed (the example names the backend)")
def test_joint_attention_tiny_runs():
    pytest.importorskip("diffusers")
    out = run_example("joint_attention.py", "--tiny")
    # Both self-attentions sparse, the 7 text tokens found before the 5x8x8 video grid.
    assert "2 attention site(s): 2 sparse, 0 dense" in out and "(5, 8, 8)  (7, 0)" in out
    assert "denoising step: inductor" in out and "speedup" in out


def test_block_map_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "map.png"
    out = run_example("block_map.py", "--grid", "4", "8", "8", "--sparsity", "0.75", "--out", str(path))
    assert "4 x 4 tiles, 0.250 kept (k = 1)" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
