"""The runner on an image-text model (a tiny LLaVA folder with its LlavaProcessor, built offline):
scene pictures, the examples encoder (labels masked on the prompt and the image tokens, pixels
reaching the model), image checks before training (exit 2 naming the record and the image, or
--skip-bad counting it), every method on a LLaVA folder with CoIN-style files and images, LoRA on
the language model only (the vision tower untouched), --train-projector averaged by DEMA, and
the images mattering (blank test images lower the accuracy)."""
import json
import random

import pytest
import torch

from cl_core.cli import main
from cl_core.continual import images as I
from cl_core.continual import multimodal as M
from cl_core.continual import synthetic as S
from cl_core.continual import tiny_model as T
from cl_core.continual.encoders import IGNORE, ImageTextEncoder, TextEncoder
from tests.runner.test_cli_run import _one_error_line


@pytest.fixture(scope="module")
def processor():
    return M.tiny_processor()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, processor):
    """An untrained tiny LLaVA with its processor: an ordinary image-text-to-text folder."""
    path = tmp_path_factory.mktemp("llava")
    T.build_llava(processor.tokenizer, hidden_size=32, num_layers=1, num_heads=2, image_size=I.IMAGE_SIZE,
                  patch_size=I.PATCH_SIZE).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- pictures

def test_scene_text_round_trips_and_every_field_is_drawn():
    rng = random.Random(0)
    for _ in range(200):
        scene = S.random_scene(rng, 1, 3)
        assert I.scene_from_description(scene.describe()) == scene
        img = I.draw_scene(scene)
        assert img.size == (I.IMAGE_SIZE, I.IMAGE_SIZE) and img.mode == "RGB"
    base = S.SceneObject("red", "circle", "big", (1, 2, 6, 8), "stop")
    pixels = lambda o: I.draw_scene(S.Scene((o,))).tobytes()  # noqa: E731
    ref = pixels(base)
    # each field changes the picture: colour, shape, size, box, word
    for change in ({"color": "blue"}, {"shape": "star"}, {"size": "small"}, {"box": (0, 0, 3, 3)},
                   {"word": "exit"}):
        other = S.SceneObject(**{**base.__dict__, **change})
        assert pixels(other) != ref, change
    # the eight word glyphs differ from each other
    glyphs = set()
    for w in S.WORDS:
        img = I.draw_scene(S.Scene((S.SceneObject("red", "circle", "big", (1, 2, 6, 8), w),)))
        glyphs.add(img.crop((I.LABEL_H, 0, I.IMAGE_SIZE, I.LABEL_H)).tobytes())   # the caption's word half
    assert len(glyphs) == len(S.WORDS)
    with pytest.raises(ValueError, match="a scene object needs"):
        I.scene_from_description("scene : red small circle stop 1 2 3 ;")
    with pytest.raises(ValueError, match="not a scene description"):
        I.scene_from_description("red small circle stop 1 2 3 4 ;")


def test_multimodal_bundled_prompts_have_no_scene_text():
    from cl_core.continual.config import RunConfig
    from cl_core.continual.tasks import load_tasks

    cfg = RunConfig(tasks=("gqa", "grounding"), n_train=8, n_test=4, multimodal=True)
    text, mm = load_tasks(cfg), load_tasks(cfg, with_images=True)
    for t, m in zip(text, mm):
        assert len(m.train_images) == len(m.train) and len(m.test_images) == len(m.test)
        for (p, a, ins), (q, b, ins2), scene in zip(t.train, m.train, m.train_images):
            assert "scene :" in p and "scene :" not in q and (a, ins) == (b, ins2)
            assert p == scene.describe() + "\n" + q


# --------------------------------------------------------------------------- encoder

def test_image_text_encoder_masks_prompt_and_image_tokens(processor):
    enc = ImageTextEncoder(processor, M.load_image)
    scene = S.random_scene(random.Random(1), 1, 1)
    n_img = (I.IMAGE_SIZE // I.PATCH_SIZE) ** 2
    ex = enc.example("what color is the star ?", "red", scene, max_length=96)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.count(enc.image_token_id) == n_img and ex["pixel_values"].shape == (1, 3, 48, 48)
    answer = processor.tokenizer("red", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert labels[-len(answer):] == answer and all(v == IGNORE for v in labels[:-len(answer)])
    # the text part after the image equals the text encoder's prompt (one tokenizer, one layout)
    text = TextEncoder(processor.tokenizer).example("what color is the star ?", "red", None, 96)
    assert ids[n_img + 1:] == text["input_ids"][1:]          # after <s> and the image tokens: the same words
    # a long prompt keeps its image tokens whole and its end
    long = enc.example("red " * 80 + "what color is the star ?", "red", scene, max_length=64)
    assert len(long["input_ids"]) <= 64 and long["input_ids"].count(enc.image_token_id) == n_img
    # a batch with a text-only record: pixels only for the image rows, labels padded with -100
    plain = enc.example("what color is the star ?", "red", None, 96)
    batch = enc.collate([ex, plain, long])
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 3
    assert (batch["labels"][1, len(plain["input_ids"]):] == IGNORE).all()
    gen = enc.prompts(["what color is the star ?", "what color ?"], [scene, scene])
    assert gen["attention_mask"][1, 0] == 0 and gen["pixel_values"].shape[0] == 2   # left-padded


# --------------------------------------------------------------------------- your files and images

def _write_task(folder, images, task, n, *, test=False, bad=None):
    """A LLaVA conversation file (or a CoIN test file) for bundled ``task`` samples, each with its
    scene drawn into ``images/<task>/<i>.png`` and the scene line taken out of the text."""
    folder.mkdir(parents=True, exist_ok=True)
    (images / task).mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(S.generate_task(task, n, split="test" if test else "train")):
        prompt, scene = I.split_scene_prompt(s.prompt)
        rel = f"{task}/{'t' if test else ''}{i}.png"
        I.draw_scene(scene).save(images / rel)
        if test:
            records.append({"question_id": f"{task}-{i}", "image": rel, "text": f"<image>\n{prompt}",
                            "answer": s.answer})
        else:
            records.append({"id": f"{task}-{i}", "image": rel,
                            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                              {"from": "gpt", "value": s.answer}]})
    if bad is not None:
        records[bad[0]]["image"] = bad[1]
    path = folder / ("test.json" if test else "train.json")
    path.write_text(json.dumps(records))
    return path


def test_missing_image_stops_before_training(tmp_path, llava_dir, caplog):
    imgs = tmp_path / "images"
    a = _write_task(tmp_path / "GQA", imgs, "gqa", 6, bad=(3, "gqa/nowhere.png"))
    out = tmp_path / "out"
    args = ["run", "--model", str(llava_dir), "--methods", "lora", "--steps", "1", "--out", str(out), "--quiet"]
    code, line = _one_error_line(args + ["--tasks", str(a), "--image-folder", str(imgs)], caplog)
    assert code == 2 and not out.exists()
    assert str(a) in line and "record 3 (id gqa-3)" in line
    assert str(imgs / "gqa" / "nowhere.png") in line and "--skip-bad" in line
    # an unreadable file (not an image) is refused the same way
    (imgs / "gqa" / "broken.png").write_bytes(b"not a picture")
    b = _write_task(tmp_path / "GQA2", imgs, "gqa", 6, bad=(1, "gqa/broken.png"))
    code, line = _one_error_line(args + ["--tasks", str(b), "--image-folder", str(imgs)], caplog)
    assert code == 2 and "record 1 (id gqa-1)" in line and "cannot be opened" in line and not out.exists()
    # without --image-folder the relative paths do not resolve: the message names the flag
    code, line = _one_error_line(args + ["--tasks", str(b)], caplog)
    assert code == 2 and "--image-folder" in line
    # image tokens that do not fit in --max-length: refused before training
    c = _write_task(tmp_path / "GQA3", imgs, "gqa", 4)
    code, line = _one_error_line(args + ["--tasks", str(c), "--image-folder", str(imgs), "--max-length", "12"],
                                 caplog)
    assert code == 2 and "16 image tokens do not fit in" in line and "--max-length" in line and not out.exists()


def test_skip_bad_drops_and_counts_records_with_bad_images(tmp_path):
    from cl_core.continual.config import RunConfig
    from cl_core.continual.tasks import load_tasks

    imgs = tmp_path / "images"
    a = _write_task(tmp_path / "GQA", imgs, "gqa", 10, bad=(4, "gqa/gone.png"))
    cfg = RunConfig(task_files=(str(a),), image_folder=str(imgs), skip_bad=True)
    (task,) = load_tasks(cfg, with_images=True)
    assert task.skipped_images == 1 and len(task.train) + len(task.test) == 9
    assert all(p.startswith(str(imgs)) for p in task.train_images + task.test_images)
    assert "gqa/gone.png" not in " ".join(task.train_images + task.test_images)
    assert len(task.image_sizes) == 9 and set(task.image_sizes.values()) == {(48, 48)}


def test_flags_that_need_an_image_text_model(tmp_path, model_dir, caplog):
    for argv, needle in ((["--train-projector"], "--train-projector needs an image-text model"),
                         (["--train-projector", "--model", str(model_dir)], "is a text model"),
                         (["--image-folder", str(tmp_path)], "--image-folder goes with task files"),
                         (["--image-folder", str(tmp_path / "no"), "--tasks", "x.json", "--model", str(model_dir)],
                          "--image-folder is not a folder"),
                         (["--multimodal", "--tasks", "x.json", "--model", str(model_dir)], "--multimodal draws"),
                         (["--multimodal", "--train-projector", "--methods", "lora,moelora"],
                          "--train-projector cannot be combined with the moelora method")):
        code, line = _one_error_line(["run", "--methods", "lora", "--out", str(tmp_path / "o"), *argv], caplog)
        assert code == 2 and needle in line, (argv, line)


@pytest.mark.slow
def test_every_method_on_a_llava_folder(tmp_path, llava_dir, capsys):
    """CoIN layout (train conversations + question_id test files, images under --image-folder) on a
    LLaVA folder: every method runs, LoRA is on the language model only, the vision tower is never
    changed, the projector is trained and averaged (--train-projector --dema-params trainable), a bad
    image is skipped and counted with --skip-bad, and the report names the model, processor and images."""
    imgs = tmp_path / "images"
    a = _write_task(tmp_path / "GQA", imgs, "gqa", 8, bad=(2, "gqa/missing.png"))
    b = _write_task(tmp_path / "TextVQA", imgs, "textvqa", 8)
    ta = _write_task(tmp_path / "test" / "GQA", imgs, "gqa", 4, test=True)
    tb = _write_task(tmp_path / "test" / "TextVQA", imgs, "textvqa", 4, test=True)
    out = tmp_path / "out"
    methods = "lora,ema,dema,group,dema+group,lcia,cl-next"
    code = main(["run", "--tasks", str(a), str(b), "--test-tasks", str(ta), str(tb), "--model", str(llava_dir),
                 "--image-folder", str(imgs), "--skip-bad", "--train-projector", "--dema-params", "trainable",
                 "--methods", methods, "--steps", "2", "--batch-size", "4", "--max-length", "96",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(methods.split(","))
    assert results["model"]["model_type"] == "llava" and results["model"]["processor"]["processor"] == "LlavaProcessor"
    im = results["images"]
    assert im["folder"] == str(imgs) and im["skipped"] == {"GQA": 1} and im["sizes"] == {"48x48": im["count"]}
    assert im["count"] == 7 + 8 + 4 + 4
    # DEMA (from task 2) averaged the LoRA tensors and the projector, never the vision tower
    names = json.loads((out / "chains" / "dema" / "seed0" / "alpha_task1.json").read_text())["names"]
    assert any("multi_modal_projector" in n for n in names)
    assert all("vision_tower" not in n for n in names)
    assert all("language_model" in n for n in names if ".lora_" in n)
    # the saved adapters hold LoRA on the language model and the projector copy, nothing of the vision tower
    from safetensors.torch import load_file

    saved = load_file(out / "chains" / "lcia" / "seed0" / "task1" / "group_0" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in saved) and not any("vision_tower" in k for k in saved)
    report = (out / "report.md").read_text()
    assert "LlavaProcessor" in report and str(imgs) in report and "skipped" in report


@pytest.mark.slow
def test_blank_test_images_lower_the_accuracy(tmp_path):
    """A small multimodal run of the bundled GQA-like task (the colour of the object, asked by its
    shape, so the answer is only in the picture): with every test picture blank the accuracy drops."""
    from cl_core.continual.evaluation import accuracy, generate
    from cl_core.continual.run import ContinualRun, RunConfig
    from cl_core.lora_sets import LoRASets

    cfg = RunConfig(methods=("lora",), tasks=("gqa",), multimodal=True, stage1_steps=0, steps=60, n_train=480,
                    n_test=48, lr=1e-2, train_projector=True)
    runner = ContinualRun(cfg, tmp_path / "run", quiet=True, threads=1)
    results = runner.run()
    seen = results["methods"]["lora"]["matrix"][-1][0]
    sets = LoRASets.from_pretrained(runner._load_base(0), runner.chain_dir("lora", 0) / "task0")
    task = runner.tasks[0]
    prompts, answers = [p for p, _, _ in task.test], [a for _, a, _ in task.test]
    blank = generate(sets.model, runner.encoder, prompts, max_new_tokens=4, images=[I.blank_image()] * len(prompts))
    real = generate(sets.model, runner.encoder, prompts, max_new_tokens=4, images=task.test_images)
    assert accuracy("short", real, answers) == pytest.approx(seen)
    assert seen >= 50, seen                     # the colours are read from the pictures
    assert accuracy("short", blank, answers) <= seen - 30


def test_demo_multimodal_is_the_text_demo_on_pictures(captured, tmp_path):
    from cl_core.cli.run import DEMO_FULL, DEMO_METHODS, DEMO_MULTIMODAL_FULL, DEMO_MULTIMODAL_METHODS, DEMO_QUICK

    assert main(["demo", "--multimodal", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert main(["demo", "--multimodal", "--quick", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    # the text demo's plain, DEMA and grouping methods with MoELoRA (not ema, dema-paper, lcia: its
    # measured time); the full preset with its own width/steps
    assert DEMO_MULTIMODAL_METHODS == tuple(m for m in DEMO_METHODS if m in ("lora", "dema", "group", "dema+group")) \
        + ("moelora",)
    for cfg, preset in zip(captured, ({**DEMO_FULL, **DEMO_MULTIMODAL_FULL}, DEMO_QUICK)):
        assert cfg.multimodal and cfg.methods == DEMO_MULTIMODAL_METHODS and "group" in cfg.methods
        assert all(getattr(cfg, k) == v for k, v in preset.items())   # same tasks and seeds


@pytest.mark.slow
def test_multimodal_resume_equals_uninterrupted(tmp_path, llava_dir):
    """Resume reloads the LoRA sets with their projector copies: the interrupted and resumed run
    equals the uninterrupted one (tasks that re-train the set, so DEMA averages the projector)."""
    from cl_core.continual.run import RunConfig

    imgs = tmp_path / "images"
    files = tuple(str(_write_task(tmp_path / t, imgs, t, 10)) for t in ("gqa", "vqav2", "textvqa"))

    def cfg():
        return RunConfig(methods=("dema", "lcia"), task_files=files, model=str(llava_dir), image_folder=str(imgs),
                         steps=2, batch_size=4, max_length=64, train_projector=True, dema_params="trainable")

    results = assert_resume_equals_uninterrupted(cfg, tmp_path)
    assert results["methods"]["lcia"]["seeds"]["0"]["dema"] == [False, True, True]   # one set, re-trained


def assert_resume_equals_uninterrupted(cfg, tmp_path, stops=(("dema", 0), ("lcia", 1))):
    """Run ``cfg()`` uninterrupted, then interrupted after each (method, task) of ``stops`` and
    resumed; the matrices, losses and α of every method must be equal. Returns the resumed results."""
    from cl_core.continual.run import run

    reference = run(cfg(), tmp_path / "ref", quiet=True, threads=1)
    stops = set(stops)
    methods = {m for m, _ in stops}

    def interrupt(method, seed, task):
        if (method, task) in stops:
            stops.discard((method, task))
            raise KeyboardInterrupt

    out = tmp_path / "run"
    for _ in range(len(stops)):
        with pytest.raises(KeyboardInterrupt):
            run(cfg(), out, quiet=True, threads=1, on_task_end=interrupt)
    results = run(cfg(), out, quiet=True, threads=1)
    for method in methods:
        a, b = results["methods"][method]["seeds"]["0"], reference["methods"][method]["seeds"]["0"]
        assert a["matrix"] == b["matrix"] and a["loss"] == b["loss"] and a["alpha"] == b["alpha"], method
        assert any(a["alpha"]), f"{method}: no DEMA step, the comparison would be vacuous"
    return results
