"""Your own data and model, honestly: task files need a model that knows
their words; a model folder whose config does not match its weights, or without a
tokenizer, is refused in one line before anything is written; the report names the model used."""
import json
import shutil

import pytest

from cl_core.continual.run import RunConfig, run



def _task_file(path, n=6):
    path.write_text("\n".join(json.dumps({"instruction": "Summarize the input.", "input": f"red {i} circle",
                                          "output": "red"}) for i in range(n)) + "\n")
    return path


def _refused(cfg, out, needle):
    with pytest.raises(ValueError, match=needle) as exc:
        run(cfg, out, quiet=True)
    assert "\n" not in str(exc.value)  # one line
    assert not out.exists() or not any(out.iterdir())
    return str(exc.value)


def test_task_files_without_a_model_are_refused(tmp_path):
    f = _task_file(tmp_path / "t.jsonl")
    _refused(RunConfig(task_files=(str(f),), methods=("lora",)), tmp_path / "o", "--tasks without --model")


def test_config_that_does_not_match_the_weights(tmp_path, model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 2   # the weights hold one layer: layer 1 would be random
    (bad / "config.json").write_text(json.dumps(cfg))
    f = _task_file(tmp_path / "t.jsonl")
    _refused(RunConfig(task_files=(str(f),), model=str(bad), methods=("lora",)), tmp_path / "o",
             "does not match its config.json")


def test_model_folder_without_a_tokenizer(tmp_path, model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, bare / name)
    f = _task_file(tmp_path / "t.jsonl")
    msg = _refused(RunConfig(task_files=(str(f),), model=str(bare), methods=("lora",)), tmp_path / "o",
                   "no tokenizer inside")
    assert "sentencepiece" not in msg.lower()


def test_report_names_the_model_used(tmp_path, model_dir):
    f = _task_file(tmp_path / "t.jsonl", 10)
    out = tmp_path / "run"
    results = run(RunConfig(task_files=(str(f),), model=str(model_dir), methods=("lora",), steps=1, batch_size=4,
                            max_length=64), out, quiet=True, threads=1)
    assert results["model"]["source"] == str(model_dir)
    assert results["model"]["model_type"] == "llama" and results["model"]["parameters"] > 0
    report = (out / "report.md").read_text()
    assert f"Model: `{model_dir}` (llama, {results['model']['parameters']:,} parameters;" in report
    assert "model None" not in report
