"""``rlflow score``: a folder or a manifest of images scored with a configured reward, printed as JSON."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward
from rlflow.cli import main
from rlflow.scoring import load_image
from rlflow.types import Conditions, Media
from rlflow.worlds.shapes.scene import parse_prompt, render, sample_scene


def _write(folder, specs_and_prompts, manifest=True):
    """PNG renders of each spec, captioned with its prompt (which may ask for something else)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (drawn, prompt) in enumerate(specs_and_prompts):
        img = render(sample_scene(parse_prompt(drawn), rng))
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8), "RGB").save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": prompt, "seed": i})
    if manifest:
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _run(capsys, *argv):
    code = main(["score", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_a_manifest_with_a_registered_reward(tmp_path, capsys):
    pairs = [("a red circle", "a red circle"), ("a blue square", "a blue square"),
             ("a red square", "a red circle"), ("two triangles", "two triangles")]
    _write(tmp_path / "imgs", pairs)
    code, out, _ = _run(capsys, "--reward", "shapes_geneval", "--set", "reward.kwargs.strict_weight=1.0",
                        str(tmp_path / "imgs" / "manifest.jsonl"))
    assert code == 0
    got = json.loads(out)
    assert got["images"] == 4
    assert [r["components"]["strict"] for r in got["per_image"]] == [1.0, 1.0, 0.0, 1.0]
    assert [r["prompt"] for r in got["per_image"]] == [p for _, p in pairs]
    # the same numbers as the reward called on the decoded files directly
    imgs = torch.stack([load_image(tmp_path / "imgs" / f"{i}.png") for i in range(4)])
    direct = build_reward("shapes_geneval", {"strict_weight": 1.0})(Media(images=imgs), Conditions.of([p for _, p in pairs]))
    assert [r["score"] for r in got["per_image"]] == pytest.approx(direct.score.tolist())
    assert got["mean"]["score"] == pytest.approx(0.75)
    assert got["mean"]["partial"] == pytest.approx(float(direct.components["partial"].double().mean()))


def test_score_with_a_config_file_and_batches_of_one(tmp_path, capsys):
    _write(tmp_path / "imgs", [("a green circle", "a green circle"), ("a yellow square", "a green square")])
    (tmp_path / "cfg.yaml").write_text("reward:\n  name: tests.plugins.my_rewards:brightness\n  kwargs: {scale: 2.0}\n")
    code, out, _ = _run(capsys, "--reward", str(tmp_path / "cfg.yaml"), "--batch-size", "1", str(tmp_path / "imgs"))
    assert code == 0
    got = json.loads(out)
    expect = [2.0 * float(load_image(tmp_path / "imgs" / f"{i}.png").mean()) for i in range(2)]
    assert [r["score"] for r in got["per_image"]] == pytest.approx(expect, rel=1e-6)


def test_a_folder_without_manifest_is_scored_with_empty_prompts(tmp_path, capsys):
    _write(tmp_path / "imgs", [("a red circle", "x"), ("a blue circle", "y")], manifest=False)
    code, out, _ = _run(capsys, "--reward", "tests.plugins.my_rewards:brightness", "--summary", str(tmp_path / "imgs"))
    assert code == 0
    got = json.loads(out)
    assert got["images"] == 2 and "per_image" not in got
    expect = np.mean([float(load_image(tmp_path / "imgs" / f"{i}.png").mean()) for i in range(2)])
    assert got["mean"]["score"] == pytest.approx(expect, rel=1e-6)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "--reward", "shapes_geneval", str(tmp_path / "missing"))
    assert code == 2 and "neither a folder of images nor a manifest.jsonl" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "--reward", "shapes_geneval", str(tmp_path / "empty"))
    assert code == 2 and "no images" in err
    _write(tmp_path / "imgs", [("a red circle", "a red circle")])
    with open(tmp_path / "imgs" / "manifest.jsonl", "a") as f:
        f.write('{"image": "nope.png", "prompt": "a circle"}\n')
    code, _, err = _run(capsys, "--reward", "shapes_geneval", str(tmp_path / "imgs"))
    assert code == 2 and "line 2: image file not found" in err and "nope.png" in err
    (tmp_path / "imgs" / "manifest.jsonl").write_text('{"image": "0.png", "prompt": "a red circle"}\n')
    code, _, err = _run(capsys, "--reward", "no_such_reward", str(tmp_path / "imgs"))
    assert code == 2 and "reward.name 'no_such_reward' is not registered" in err
    code, _, err = _run(capsys, "--reward", "shapes_geneval", "--set", "reward.replicas=0", str(tmp_path / "imgs"))
    assert code == 2 and "reward.replicas" in err
