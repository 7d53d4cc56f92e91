"""``rlflow sample``: a run's checkpoint (or its base) as PNGs plus manifest.jsonl, identical on a second call."""

import json

import numpy as np
from PIL import Image

from rewards import build_reward
from rlflow.cli import main
from rlflow.samples import to_png
from rlflow.trainer import Trainer
from rlflow.types import Conditions
from tests.helpers import tiny_config, tiny_run

TINY = tiny_run(data={"eval_per_kind": 1}, algo={"name": "dppo", "kl_threshold": 1e-2},
                train={"steps": 2, "lr": 3e-2, "checkpoint_every": 2})
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_writes_the_checkpoints_images_and_a_manifest(tmp_path, capsys):
    trainer = Trainer(tiny_config(TINY, tmp_path), build_reward("shapes_geneval"), tmp_path / "run")
    trainer.run()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    args = ["--prompts", str(prompts), "--seeds", "2", "--steps", "6"]
    assert main(["sample", str(tmp_path / "run"), *args, "--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert rows == [{"image": f"{i:05d}.png", "prompt": p, "seed": s}
                    for i, (p, s) in enumerate((p, s) for p in PROMPTS for s in range(2))]
    # the images are the run's own eval sampler on its final weights (the checkpoint loaded exactly)
    media = trainer.sample(Conditions.of([r["prompt"] for r in rows]), [r["seed"] for r in rows])
    for r, image in zip(rows, media.stills, strict=True):
        assert np.array_equal(_pixels(tmp_path / "a" / r["image"]), np.asarray(to_png(image)))
    assert _pixels(tmp_path / "a" / "00000.png").shape == (32, 32, 3)
    # a second call, here on the checkpoint folder itself, writes the same bytes
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert main(["sample", str(ckpt), *args, "--out", str(tmp_path / "b")]) == 0
    for name in ["manifest.jsonl", *(r["image"] for r in rows)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # --base: the model without the LoRA
    assert main(["sample", str(tmp_path / "run"), *args, "--base", "--out", str(tmp_path / "base")]) == 0
    differ = [not np.array_equal(_pixels(tmp_path / "a" / r["image"]), _pixels(tmp_path / "base" / r["image"]))
              for r in rows]
    assert any(differ)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"images": 6, "out": str(tmp_path / "base"), "from": "base model", "steps": 6}
    assert main(["sample", str(tmp_path / "run"), *args, "--adapter", "old", "--out", str(tmp_path / "c")]) == 2
    assert "--adapter 'old': this run's algorithm (dppo) has default" in capsys.readouterr().err


def test_sample_errors_name_what_is_wrong(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\n")
    assert main(["sample", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--prompts" in capsys.readouterr().err
