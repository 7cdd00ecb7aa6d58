"""``md-doctor split``: config + flags, run folder, resume (also after SIGKILL), one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import md_plugin  # noqa: F401
from md_plugin.checkpoint import load_weights
from md_plugin.cli import main
from md_plugin.errors import ConfigError, MDError
from md_plugin.splitter import SplitModules


def _argv(root, ckpt, out, *extra):
    return [
        "split", "--model", "simcnn_weak", "--model-kwargs", "width=8", "--checkpoint", str(ckpt),
        "--dataset", "torch/cifar10", "--data-dir", str(root), "--val-from-train", "0.5",
        "--classes", "0", "1", "2", "--min-confidence", "0", "--population", "4",
        "--val-images", "15", "--output", str(out), "--experiment", "run", "--no-progress",
        *extra,
    ]  # fmt: skip


def test_split_run_folder_table_and_resume(cifar10_root, tiny_strong_checkpoint, tmp_path, capsys):
    cfg = tmp_path / "split.yaml"
    cfg.write_text("generations: 2\nseed: 3\n")
    assert main([*_argv(cifar10_root, tiny_strong_checkpoint, tmp_path), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "composed 3-module accuracy" in out and "gen 2/2" in out
    run = tmp_path / "run"
    files = ("args.yaml", "modules.safetensors", "modules.csv", "history.csv", "split.log")
    for f in (*files, "sensitivity.csv", "sensitivity.png"):  # --init-ratios auto (default)
        assert (run / f).is_file(), f
    # every stage is timed in the log (wall and CPU seconds)
    assert all(f"{stage} " in out for stage in ("sensitivity", "calibration", "measure"))
    assert "s CPU)" in out
    model = timm.create_model("simcnn_weak", num_classes=10, width=8)
    with pytest.raises(MDError, match="split from another model: same architecture"):
        SplitModules.load(run / "modules.safetensors", model)  # random weights (issue 19 item 3)
    load_weights(model, tiny_strong_checkpoint)
    mods = SplitModules.load(run / "modules.safetensors", model)
    assert mods.classes == [0, 1, 2] and mods.options["config"]["seed"] == 3
    assert len(mods.options["history"]) == 2
    # the default --calibrate affine: on training images, stored and used by the modules
    assert mods.calibrated and mods.options["calibration"]["mode"] == "affine"
    assert {"sensitivity_s", "calibration_s", "calibration_cpu_s"} <= set(mods.options["timings"])
    # the folder is never overwritten
    assert main(_argv(cifar10_root, tiny_strong_checkpoint, tmp_path, "--generations", "2")) == 2
    assert "exists" in capsys.readouterr().err
    # --resume extends the same search
    assert main([*_argv(cifar10_root, tiny_strong_checkpoint, tmp_path, "--resume", "--generations", "3"),
                 "-c", str(cfg)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resuming the search from generation 2" in out and "gen 3/3" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--classes", "0", "12"], "out of range"),
        (["--population", "2"], "--population"),
        (["--generations", "x"], "invalid int value"),
        (["--resume"], "no search state"),
        (["--eval-mode", "fast"], "invalid choice"),
        # the split stages (issue 18)
        (["--init-ratios", "auto", "0.3"], "'auto' or keep ratios, not both"),
        (["--init-ratios", "0.3", "x"], "'auto' or keep ratios in (0, 1]"),
        (["--init-ratios-sensitive", "0.5"], "only apply to numeric --init-ratios"),
        (["--sensitive-fraction", "0.3"], "only apply to numeric --init-ratios"),
        (["--sensitivity-images", "2"], "at least the number of classes (3)"),
        (["--sensitivity-tolerance", "-1"], "--sensitivity-tolerance"),
        (["--calibrate-images", "0"], "--calibrate affine needs --calibrate-images >= 1"),
        (["--calibrate", "bn", "--calibrate-images", "0"], "--calibrate bn needs"),
        (["--calibrate-steps", "0"], "--calibrate-steps"),
        (["--calibrate", "fancy"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(
    cifar10_root, tiny_strong_checkpoint, tmp_path, capsys, extra, words
):
    argv = _argv(cifar10_root, tiny_strong_checkpoint, tmp_path, "--generations", "1")
    if extra[0] == "--classes":
        i = argv.index("--classes")
        argv = argv[:i] + argv[i + 4 :]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("generatons: 3\n")
    assert main(["split", "-c", str(cfg)]) == 2
    assert "did you mean 'generations'" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(cifar10_root, tiny_strong_checkpoint, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")  # fmt: skip
    cmd = [sys.executable, "-m", "md_plugin"]
    # 20 generations: on an idle machine 4 more finished within the 0.2 s before the kill landed
    full = _argv(cifar10_root, tiny_strong_checkpoint, tmp_path / "full", "--generations", "20")
    subprocess.run(cmd + full, env=env, check=True, capture_output=True)
    killed = _argv(cifar10_root, tiny_strong_checkpoint, tmp_path / "killed", "--generations", "20")
    proc = subprocess.Popen(cmd + killed, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    for line in proc.stdout:  # kill right after generation 1 is logged (margin on a loaded box)
        if line.startswith("gen 1/20"):
            time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "run" / "modules.safetensors").exists()
    subprocess.run(cmd + killed + ["--resume"], env=env, check=True, capture_output=True)
    a = SplitModules.load(tmp_path / "full" / "run" / "modules.safetensors")
    b = SplitModules.load(tmp_path / "killed" / "run" / "modules.safetensors")
    assert torch.equal(a.masks, b.masks)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a.options["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b.options["history"]]


def test_init_ratios_take_several_values_on_the_command_line_and_in_yaml(tmp_path):
    from md_plugin.splitter.cli import create_split_parser, parse_split_args
    from md_plugin.splitter.cli_config import search_config

    parser = create_split_parser()
    base = ["--model", "resnet20_cifar", "--checkpoint", "x.pth"]
    args = parse_split_args([*base, "--init-ratios", ".5", ".6", "--init-ratios-sensitive", ".9"])
    cfg = search_config(args, parser)
    assert cfg.ratios == (0.5, 0.6) and cfg.ratios_sensitive == (0.9,)
    y = tmp_path / "s.yaml"
    y.write_text("init_ratios: [0.25, 0.35]\n")
    cfg = search_config(parse_split_args(["-c", str(y), *base]), parser)
    assert cfg.ratios == (0.25, 0.35) and cfg.ratios_sensitive == (0.5, 0.6, 0.7)
    with pytest.raises(ConfigError, match="init ratios"):
        search_config(parse_split_args([*base, "--init-ratios", "1.5"]), parser)
