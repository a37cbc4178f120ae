"""User errors: every `igpt` command answers bad input with one line, `igpt CMD: error: …`, and exit code 2."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from igpt.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "cifar10-cpu-tiny.yaml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Small valid inputs, so that each case gets past everything but its one bad input."""
    from safetensors.torch import save_file

    from igpt.data_pipeline.io import file_sha256
    from igpt.data_pipeline.palette import save_palette, uniform9_palette
    from igpt.data_pipeline.shard import shard_dataset
    from igpt.pretrain.config import load_config, save_config
    from igpt.pretrain.model import IGPT
    from igpt.pretrain.presets import model_config

    root = tmp_path_factory.mktemp("cli_inputs")
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), (60 * i, 100 if c == "a" else 0, 0)).save(root / "images" / c / f"{i}.png")
    save_palette(uniform9_palette(), root / "palette.npy")
    other = uniform9_palette().copy()
    other[0] = [1, 2, 3]
    save_palette(other, root / "other.npy")
    shard_dataset([str(root / "images")], root / "tokens", root / "palette.npy", resolution=4, val_fraction=0.25,
                  num_workers=1, progress=False)
    release = root / "foreign_release"  # weights made for another palette than the shards'
    release.mkdir()
    model = IGPT(model_config("igpt-tiny", n_ctx=16, n_embd=16, n_head=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, release / "model.safetensors",
              metadata={"palette_sha256": file_sha256(root / "other.npy")})
    save_config(load_config(None, [f"data.dir={root / 'tokens'}", "model.preset=igpt-tiny", "model.n_ctx=16",
                                   "model.n_embd=16", "model.n_head=2"]), release / "config.yaml")
    shutil.copyfile(root / "other.npy", release / "palette.npy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    return {"root": str(root), "images": str(root / "images"), "palette": str(root / "palette.npy"),
            "other": str(root / "other.npy"), "tokens": str(root / "tokens"), "release": str(release),
            "missing": str(root / "missing"), "offline": f"http://127.0.0.1:{closed_port}/cifar-10-binary.tar.gz"}


CASES = [
    ("palette fit", "palette fit --source {missing} --out {root}/p.npy", "does not exist"),
    ("palette fit", "palette fit --out {root}/p.npy", "needs --source"),
    ("data shard", "data shard {missing} --out {root}/o --palette {palette}", "does not exist"),
    ("data shard", "data shard {images} --out {tokens} --palette {other} --resolution 4 --val-fraction 0.25",
     "other settings"),  # a palette that does not match the shards already there
    ("data shard", "data shard {images} --out {root}/m --palette {palette} --resolution 4 --margin 7",
     "margin must be in [0, 6]"),
    ("data inspect", "data inspect {missing}", "no manifest.json"),
    ("data inspect", "data inspect {tokens} --split bogus", "split 'bogus' not in the manifest"),
    ("train", f"train {TINY} model.bogus=1", "config key 'model.bogus'"),
    ("train", f"train {TINY} train.steps=-3", "'train.steps' must be >= 1"),
    ("train", "train {missing}.yaml", "config file not found"),
    ("train", f"train {TINY} model.unit=patch model.objective=bert", "not supported with unit='patch'"),
    ("export", "export {missing} --out {root}/rel", "not a training run dir"),
    ("export", "export {root} --out {tokens}", "exists and is not empty"),
    ("eval nll", "eval nll --checkpoint {release} --data {tokens} --out {root}/e", "palette mismatch"),
    ("eval sample", "eval sample --checkpoint {missing} --data {tokens} --out {root}/e", "neither a release dir"),
    ("eval probe", "eval probe --checkpoint {release} --data {tokens} --set probe.l3=[1]", "search config key"),
    ("eval finetune", "eval finetune --checkpoint {release} --data {missing}", "no manifest.json"),
    ("launch slurm", "launch slurm {missing}.yaml --dry-run", "config file not found"),
    ("launch slurm", f"launch slurm {TINY} optim.lr=-1 --dry-run", "'optim.lr' must be > 0"),
    ("launch slurm", "launch slurm --dry-run -- eval probe --checkpoint {release} --data {tokens} --bogus",
     "unrecognized arguments: --bogus"),
    ("launch ray", f"launch ray {TINY} --address http://127.0.0.1:9 --env NOVALUE", "expected KEY=VALUE"),
    ("launch ray", "launch ray {missing}.yaml --address http://127.0.0.1:9", "config file not found"),
    ("demo", "demo --source {missing} --workdir {root}/demo", "does not exist"),
    ("demo", "demo --data-url {offline} --data-cache {root}/cache --workdir {root}/demo", "point --source at"),
]


@pytest.mark.parametrize("command, argv, words", CASES, ids=[f"{c}: {w}" for c, _, w in CASES])
def test_bad_input_is_one_line_with_exit_code_2(inputs, capsys, command, argv, words):
    rc = main(argv.format(**inputs).split())
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[demo]")]  # the demo's own progress log
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"igpt {command}: error: ") and words in lines[0], err


def test_launch_warns_about_paths_this_host_lacks(inputs, capsys):
    rc = main(["launch", "slurm", TINY, f"data.dir={inputs['missing']}", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0 and "#SBATCH" in out  # the cluster's nodes may see the path: rendered all the same
    assert f"igpt launch slurm: warning: data.dir {inputs['missing']} does not exist on this host" in err
    rc = main(["launch", "slurm", TINY, f"data.dir={inputs['tokens']}", f"train.init_from={inputs['missing']}",
               "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0 and f"warning: train.init_from {inputs['missing']} does not exist on this host" in err
    rc = main(["launch", "slurm", "--dry-run", "--", "eval", "nll", "--checkpoint", inputs["release"], "--data",
               inputs["tokens"]])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_console_script_prints_no_traceback_and_debug_does(tmp_path):
    cmd = [sys.executable, "-c", "import sys; from igpt.cli import main; sys.exit(main())", "train", TINY,
           "model.bogus=1"]
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr == "igpt train: error: config key 'model.bogus': Key 'bogus' not in 'ModelSection'\n"
    debug = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
