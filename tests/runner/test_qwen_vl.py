"""The runner on the Qwen-VL family (cl_core.continual.qwen_vl): a tiny Qwen2-VL and a tiny
Qwen2.5-VL built offline from configs, saved with their processor's files (the PIL image
processor and the tokenizer) and loaded back through ``--model DIR``:

* the image-token count equals t·h·w / 4 for several image sizes, and a batch of variable-size
  images (patch sets concatenated, ``image_grid_thw`` carried, ``mm_token_type_ids`` padded)
  gives each row the logits it has alone;
* a record whose text holds the image markers, an image too large for ``--max-length``, and a
  processor whose patch size disagrees with the model are refused before training, naming the
  record / the files;
* every method runs on CoIN-style files (LoRA and DEMA on the language model only, MoELoRA's
  experts too; the patch merger trained and averaged with --train-projector);
* resume equals an uninterrupted run; the images matter (blank test images score lower).
"""
import json

import pytest
import torch

from cl_core.cli import main
from cl_core.continual import images as I
from cl_core.continual import multimodal as M
from cl_core.continual import qwen_vl as Q
from tests.runner.test_cli_run import _one_error_line
from tests.runner.test_multimodal import _write_task, assert_resume_equals_uninterrupted

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
STEPS_TO_READ = {"qwen2_vl": 60, "qwen2_5_vl": 100}   # steps to read colours (test_blank_test_images...)
PATCH = I.PATCH_SIZE // 2          # 6-pixel patches merged 2 x 2: a 48-pixel picture gives 16 tokens


def _save(path, model_type, *, hidden_size=32, num_layers=1, seed=0):
    proc = Q.tiny_processor(image_size=I.IMAGE_SIZE, patch_size=PATCH)
    Q.build_tiny(model_type, proc.tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=2,
                 image_size=I.IMAGE_SIZE, patch_size=PATCH, seed=seed).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_dir(request, tmp_path_factory):
    """An untrained tiny Qwen2-VL / Qwen2.5-VL with its processor files: an ordinary model folder."""
    return _save(tmp_path_factory.mktemp(request.param), request.param)


def test_folder_loads_back_without_torchvision_and_counts_tokens_from_the_grid(qwen_dir):
    from PIL import Image

    assert M.is_image_text_folder(qwen_dir) and Q.is_qwen_vl(M.model_type(qwen_dir))
    enc = M.encoder_for(type("Cfg", (), {"model": str(qwen_dir), "multimodal": False})())
    assert isinstance(enc, Q.QwenVLEncoder) and type(enc.processor.image_processor).__name__ == \
        "Qwen2VLImageProcessorPil"
    rng = torch.Generator().manual_seed(0)
    sizes = [(48, 48), (60, 37), (120, 30), (13, 90), (200, 150)]
    pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
                for w, h in sizes]
    items = []
    for (w, h), pic in zip(sizes, pictures):
        item = enc.example("what color is the star ?", "red", pic, max_length=4096)
        t, gh, gw = item["image_grid_thw"][0].tolist()
        n = item["input_ids"].count(enc.image_token_id)
        assert n == t * gh * gw // 4 and (n, (t, gh, gw)) == enc.processor.image_tokens(w, h)
        assert gh % 2 == 0 and gw % 2 == 0 and item["pixel_values"].shape == (t * gh * gw, 3 * 2 * PATCH * PATCH)
        ids = item["input_ids"]   # <|vision_start|> pads <|vision_end|>, then the prompt
        start = ids.index(enc.tokenizer.convert_tokens_to_ids(Q.VISION_START))
        assert ids[start + n + 1] == enc.image_end_id and set(ids[start + 1:start + n + 1]) == {enc.image_token_id}
        items.append(item)
    assert len({x["input_ids"].count(enc.image_token_id) for x in items}) == len(sizes)   # all different

    # A batch of them: patches concatenated in row order, the grids carried, the token types
    # padded with the ids; every row's logits equal that row's alone (right padding).
    plain = enc.example("what color ?", "red", None, max_length=64)       # a text-only row between
    rows = items[:2] + [plain] + items[2:4]
    batch = enc.collate(rows)
    assert batch["pixel_values"].shape[0] == sum(x["pixel_values"].shape[0] for x in items[:4])
    assert batch["image_grid_thw"].tolist() == [x["image_grid_thw"][0].tolist() for x in items[:4]]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == enc.image_token_id).int())
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen_dir).eval()
    with torch.no_grad():
        together = model(**batch).logits
        for k, row in enumerate(rows):
            alone = model(**enc.collate([row])).logits[0]
            torch.testing.assert_close(together[k, :alone.shape[0]], alone, rtol=1e-4, atol=1e-5)


def test_bad_records_and_mismatched_folders_are_refused_before_training(tmp_path, qwen_dir, caplog):
    imgs = tmp_path / "images"
    a = _write_task(tmp_path / "GQA", imgs, "gqa", 6)
    out = tmp_path / "out"
    args = ["run", "--model", str(qwen_dir), "--methods", "lora", "--steps", "1", "--out", str(out), "--quiet",
            "--image-folder", str(imgs)]
    # the image markers written into a record's text
    records = json.loads(a.read_text())
    records[3]["conversations"][0]["value"] = f"<image>\n{Q.IMAGE_PAD} what color ?"
    b = tmp_path / "marked.json"
    b.write_text(json.dumps(records))
    code, line = _one_error_line(args + ["--tasks", str(b)], caplog)
    assert code == 2 and "task marked" in line and "gqa/3.png" in line and Q.IMAGE_PAD in line and not out.exists()
    # an image larger than --max-length leaves room for (300 x 200, scaled to the 192² pixel budget: 38 x 26 patches)
    from PIL import Image

    Image.new("RGB", (300, 200), "white").save(imgs / "gqa" / "big.png")
    records = json.loads(a.read_text())
    records[1]["image"] = "gqa/big.png"
    c = tmp_path / "big.json"
    c.write_text(json.dumps(records))
    code, line = _one_error_line(args + ["--tasks", str(c), "--max-length", "96"], caplog)
    assert code == 2 and "300x200 image takes 247 image tokens (grid (1, 26, 38)" in line and "--max-length" in line
    assert "big.png" in line and not out.exists()
    # a processor whose patch size is not the vision tower's
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(qwen_dir, bad)
    cfg = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**cfg, "patch_size": 8}))
    code, line = _one_error_line(["run", "--model", str(bad), *args[3:], "--tasks", str(a)], caplog)
    assert code == 2 and "patch_size is 8" in line and "preprocessor_config.json" in line and not out.exists()
    (bad / "preprocessor_config.json").unlink()
    code, line = _one_error_line(["run", "--model", str(bad), *args[3:], "--tasks", str(a)], caplog)
    assert code == 2 and "no preprocessor_config.json" in line


def test_token_count_mismatch_names_the_image():
    """A tokenizer that does not keep <|image_pad|> one token: the count no longer matches the
    grid, and the encoder says so (instead of the model's feature/token shape error)."""
    from cl_core.continual import synthetic, tiny_model

    proc = Q.tiny_processor(image_size=I.IMAGE_SIZE, patch_size=PATCH)
    split = tiny_model.build_tokenizer(tiny_model.build_vocab(synthetic.vocabulary_texts()) + list(Q.SPECIAL_TOKENS))
    split.add_tokens([Q.VISION_START, Q.VISION_END], special_tokens=True)   # <|image_pad|> left out
    enc = Q.QwenVLEncoder(Q.QwenVLProcessor(proc.image_processor, split), M.load_image)
    with pytest.raises(ValueError, match=r"image Image: the text holds 0 <\|image_pad\|> tokens, its grid "
                                         r"\(1, 8, 8\) needs 16"):
        enc.example("what color ?", "red", I.blank_image(), max_length=96)


@pytest.mark.slow
def test_every_method_on_a_qwen_folder(tmp_path, qwen_dir, capsys):
    """CoIN layout on a Qwen-VL folder: every method runs (MoELoRA included); LoRA, DEMA and
    MoELoRA's experts are on the language model only, the vision tower never changes; the report
    names the model and its processor."""
    from safetensors.torch import load_file

    imgs = tmp_path / "images"
    a = _write_task(tmp_path / "GQA", imgs, "gqa", 8)
    b = _write_task(tmp_path / "TextVQA", imgs, "textvqa", 8)
    ta = _write_task(tmp_path / "test" / "GQA", imgs, "gqa", 4, test=True)
    tb = _write_task(tmp_path / "test" / "TextVQA", imgs, "textvqa", 4, test=True)
    out = tmp_path / "out"
    methods = "lora,ema,dema,group,dema+group,lcia,cl-next,moelora"
    code = main(["run", "--tasks", str(a), str(b), "--test-tasks", str(ta), str(tb), "--model", str(qwen_dir),
                 "--image-folder", str(imgs), "--methods", methods, "--steps", "2", "--batch-size", "4",
                 "--max-length", "96", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    model_type = json.loads((qwen_dir / "config.json").read_text())["model_type"]
    assert set(results["methods"]) == set(methods.split(","))
    assert results["model"]["model_type"] == model_type
    assert results["model"]["processor"]["processor"] == "QwenVLProcessor"
    assert results["model"]["processor"]["image_processor"] == "Qwen2VLImageProcessorPil"
    assert results["images"]["sizes"] == {"48x48": 24}
    names = json.loads((out / "chains" / "dema" / "seed0" / "alpha_task1.json").read_text())["names"]
    assert names and all("language_model" in n and ".lora_" in n for n in names)     # DEMA: the LM's LoRA only
    saved = load_file(out / "chains" / "dema" / "seed0" / "task1" / "group_0" / "adapter_model.safetensors")
    assert saved and all("language_model" in k for k in saved)
    experts = load_file(out / "chains" / "moelora" / "seed0" / "task1" / "moelora.safetensors")
    assert experts and all("language_model" in k for k in experts) and not any("visual" in k for k in experts)
    report = (out / "report.md").read_text()
    assert "QwenVLProcessor" in report and model_type in report


@pytest.mark.slow
def test_projector_is_the_patch_merger_trained_and_averaged(tmp_path, caplog):
    """--train-projector on Qwen-VL trains the patch merger (visual.merger), and DEMA with
    --dema-params trainable averages it beside the LoRA tensors; the vision blocks stay frozen.
    With a grouping method (test instances routed to LoRA sets) it is refused before training."""
    from safetensors.torch import load_file

    folder = _save(tmp_path / "qwen", "qwen2_5_vl")
    imgs = tmp_path / "images"
    files = [str(_write_task(tmp_path / t, imgs, t, 8)) for t in ("gqa", "vqav2")]
    out = tmp_path / "out"
    args = ["run", "--tasks", *files, "--model", str(folder), "--image-folder", str(imgs), "--train-projector",
            "--steps", "2", "--batch-size", "4", "--max-length", "96", "--out", str(out), "--quiet"]
    code, line = _one_error_line(args + ["--methods", "dema,lcia"], caplog)
    assert code == 2 and "--train-projector" in line and "cannot be combined with lcia" in line and not out.exists()
    assert main(args + ["--methods", "dema", "--dema-params", "trainable"]) == 0
    names = json.loads((out / "chains" / "dema" / "seed0" / "alpha_task1.json").read_text())["names"]
    assert any("visual.merger" in n for n in names) and not any("visual.blocks" in n for n in names)
    assert any(".lora_" in n and "language_model" in n for n in names)
    saved = load_file(out / "chains" / "dema" / "seed0" / "task1" / "group_0" / "adapter_model.safetensors")
    assert any("merger" in k for k in saved) and not any("blocks" in k for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_resume_equals_uninterrupted(tmp_path, model_type):
    """Interrupted after a task and resumed, a Qwen-VL chain equals the uninterrupted one (the
    LoRA sets and the grouper reloaded; DEMA re-trains the set of lcia's one group)."""
    from cl_core.continual.run import RunConfig

    folder = _save(tmp_path / "qwen", model_type)
    imgs = tmp_path / "images"
    files = tuple(str(_write_task(tmp_path / t, imgs, t, 10)) for t in ("gqa", "vqav2", "textvqa"))

    def cfg():
        return RunConfig(methods=("lcia",), task_files=files, model=str(folder), image_folder=str(imgs),
                         steps=2, batch_size=4, max_length=64)

    # stopped after task 1 and again after task 2: the routed set and its DEMA resumed twice
    results = assert_resume_equals_uninterrupted(cfg, tmp_path, stops=(("lcia", 0), ("lcia", 1)))
    assert results["methods"]["lcia"]["seeds"]["0"]["dema"] == [False, True, True]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_blank_test_images_lower_the_accuracy(tmp_path, model_type):
    """The bundled GQA-like task (the colour of the object asked by its shape: the answer is only
    in the picture) as CoIN files on an untrained tiny Qwen-VL folder, LoRA with the patch merger
    trained: with every test picture blank the accuracy drops. Seen here: Qwen2-VL 87.5 % vs 14.6 %
    blank after 60 steps; Qwen2.5-VL 72.9 % vs 20.8 % after 100 (39.6 % after 60: its windowed
    vision tower learns more slowly)."""
    from cl_core.continual.evaluation import accuracy, generate
    from cl_core.continual.run import ContinualRun, RunConfig
    from cl_core.lora_sets import LoRASets

    folder = _save(tmp_path / "qwen", model_type, hidden_size=64, num_layers=2)
    imgs = tmp_path / "images"
    train = _write_task(tmp_path / "GQA", imgs, "gqa", 480)
    test = _write_task(tmp_path / "test", imgs, "gqa", 48, test=True)
    cfg = RunConfig(methods=("lora",), task_files=(str(train),), test_files=(str(test),), task_types=("short",),
                    model=str(folder), image_folder=str(imgs), steps=STEPS_TO_READ[model_type], batch_size=16,
                    lr=1e-2, max_length=64,
                    train_projector=True)
    runner = ContinualRun(cfg, tmp_path / "run", quiet=True, threads=1)
    seen = runner.run()["methods"]["lora"]["matrix"][-1][0]
    sets = LoRASets.from_pretrained(runner._load_base(0), runner.chain_dir("lora", 0) / "task0")
    task = runner.tasks[0]
    prompts, answers = [p for p, _, _ in task.test], [a for _, a, _ in task.test]
    blank = generate(sets.model, runner.encoder, prompts, max_new_tokens=4, images=[I.blank_image()] * len(prompts))
    assert seen >= 50, seen                     # the colours are read from the pictures
    assert accuracy("short", blank, answers) <= seen - 30


def test_demo_and_run_take_the_model_family(captured, tmp_path, caplog):
    """--model-family picks the bundled multimodal benchmark's tiny model (LLaVA by default), on
    the demo and on `cl-core run --multimodal`; without --multimodal it is refused in one line."""
    assert main(["demo", "--multimodal", "--quick", "--model-family", "qwen2.5-vl", "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    assert main(["demo", "--multimodal", "--quick", "--out", str(tmp_path / "l"), "--quiet"]) == 0
    assert main(["run", "--multimodal", "--model-family", "qwen2-vl", "--bundled-tasks", "all", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    assert [c.model_family for c in captured] == ["qwen2.5-vl", "llava", "qwen2-vl"]
    assert all(c.multimodal for c in captured)
    code, line = _one_error_line(["demo", "--model-family", "qwen2-vl", "--out", str(tmp_path / "t")], caplog)
    assert code == 2 and "--model-family qwen2-vl" in line and "add --multimodal" in line
    # the bundled tiny Qwen-VL: its processor, 16 image tokens per 48-pixel picture as the tiny LLaVA's
    enc = M.encoder_for(captured[0])
    assert isinstance(enc, Q.QwenVLEncoder)
    assert enc.processor.image_tokens(I.IMAGE_SIZE, I.IMAGE_SIZE) == (16, (1, 8, 8))
