"""Hostile model directories: no code from them runs, nothing is unpickled, nothing is downloaded, and
each one is a one-line error (exit 2).

The directories are copies of the built-in tiny models with one thing changed: an `auto_map` naming a
Python file that writes a marker when imported, a model_index.json naming modules other than diffusers /
transformers, weights only as a pickle, an adapter whose base is a Hub repository id, tokenizers without
usable special tokens.

`rlgen merge`'s hostile inputs are here too: model directories whose links, FIFOs or shard index point
outside them, YAML alias bombs, temporary outputs left by killed merges, inputs truncated while being read.
Each is one line on stderr, exit 2, nothing outside the inputs read and no output left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import merge_error as run_error
from cli_helpers import rlgen, rlgen_ok
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"


def run_rlgen(args: list, cwd: Path, stdin: str = "", env_drop: tuple = (), prelude: str = "") -> subprocess.CompletedProcess:
    """`rlgen ARGS` in a fresh interpreter; `prelude` runs first (e.g. to fence off the network)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RLGEN_DEBUG", *env_drop)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    code = f"{prelude}\nimport sys\nfrom rlgen.cli.app import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=240)


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> str:
    detail = f"stdout={out!r}\nstderr={err!r}"
    assert code == 2, detail
    assert "Traceback" not in err, detail
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), detail
    for text in expected:
        assert text in lines[0], f"{text!r} not in the message\n{detail}"
    assert out == "", detail
    return lines[0]


def copy_model(name: str, to: Path) -> Path:
    shutil.copytree(resolve_model_path(name) if name == "tiny-arith" else REPO / "rlgen" / "builtin_models" / name, to)
    return to


def edit_json(path: Path, **changes) -> None:
    """Set keys (None removes one)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def plant_code(directory: Path, marker: Path) -> None:
    """A module in the model directory that leaves `marker` behind if it is ever imported."""
    (directory / "hostile.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        Path({str(marker)!r}).write_text("the model directory's code ran")
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
        class HostileConfig(LlamaConfig):
            model_type = "hostile"
        class HostileForCausalLM(LlamaForCausalLM):
            config_class = HostileConfig
        class HostileTokenizer(PreTrainedTokenizerFast):
            pass
        """))


# --- 1. no code from model directories ---

@pytest.mark.slow  # a fresh interpreter
def test_auto_map_dir_is_refused_without_prompt_even_with_y_on_stdin(tmp_path):
    model = copy_model("tiny-arith", tmp_path / "model")
    marker = tmp_path / "code-ran"
    plant_code(model, marker)
    edit_json(model / "config.json", model_type="hostile", architectures=["HostileForCausalLM"],
              auto_map={"AutoConfig": "hostile.HostileConfig", "AutoModelForCausalLM": "hostile.HostileForCausalLM"})
    proc = run_rlgen(["sample", "--model", model, "--task", "arithmetic", "--limit", "1"], tmp_path, stdin="y\n")
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "config.json", "auto_map",
                          "never runs code from model directories")
    assert "custom code" not in proc.stdout and "[y/N]" not in proc.stdout  # no prompt on the JSONL stream
    assert not marker.exists()


def test_custom_tokenizer_class_is_refused(tmp_path):
    model = copy_model("tiny-arith", tmp_path / "model")
    marker = tmp_path / "code-ran"
    plant_code(model, marker)
    edit_json(model / "tokenizer_config.json", tokenizer_class="HostileTokenizer",
              auto_map={"AutoTokenizer": [None, "hostile.HostileTokenizer"]})
    code, out, err = rlgen("sample", "--model", model, "--task", "arithmetic", "--limit", "1")
    assert_one_line_error(code, out, err, "tokenizer_config.json", "auto_map", "never runs code")
    assert not marker.exists()


def test_auto_map_beside_a_transformers_architecture_loads_the_builtin_class(tmp_path):
    """With trust_remote_code=False an auto_map is ignored when transformers knows the architecture."""
    model = copy_model("tiny-arith", tmp_path / "model")
    marker = tmp_path / "code-ran"
    plant_code(model, marker)
    edit_json(model / "config.json", auto_map={"AutoModelForCausalLM": "hostile.HostileForCausalLM"})
    loaded = load_model(model)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


# --- 2. model_index.json: diffusers / transformers classes only ---

@pytest.mark.slow  # a fresh interpreter
def test_model_index_naming_another_module_does_not_import_it(tmp_path):
    model = copy_model("tiny-digits", tmp_path / "pipe")
    edit_json(model / "model_index.json", unet=["this", "Zen"])
    prelude = "import atexit, sys\natexit.register(lambda: sys.stderr.write('IMPORTED this\\n') if 'this' in sys.modules else None)"
    proc = run_rlgen(["sample", "--model", model, "--prompts", "-", "--limit", "1"], tmp_path,
                     stdin=json.dumps({"prompt": "3"}) + "\n", prelude=prelude)
    assert "Beautiful is better than ugly" not in proc.stdout + proc.stderr  # `import this` prints the Zen
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "model_index.json", "'unet'", "'this'")


@pytest.mark.parametrize("spec", [["os", "system"], ["builtins", "eval"], ["diffusers", "DiffusionPipeline"],
                                  ["transformers", "pipeline"], ["diffusers", "__class__"], ["diffusers"], "UNet2DModel"])
def test_model_index_allow_list(tmp_path, spec):
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model

    model = copy_model("tiny-digits", tmp_path / "pipe")
    edit_json(model / "model_index.json", unet=spec)
    with pytest.raises(RlgenError, match=r"model_index.json: key 'unet'") as info:
        load_diffusion_model(DiffusionModelConfig(path=str(model)))
    assert len(str(info.value).splitlines()) == 1


def test_unused_model_index_entries_are_never_imported(tmp_path):
    """Only the components rlgen uses are loaded; the rest (safety checker, ...) are not even imported."""
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model

    model = copy_model("tiny-digits", tmp_path / "pipe")
    edit_json(model / "model_index.json", safety_checker=["rlgen_never_imported_module", "Checker"])
    loaded = load_diffusion_model(DiffusionModelConfig(path=str(model)))
    assert type(loaded.denoiser).__name__ == "UNet2DModel"
    assert "rlgen_never_imported_module" not in sys.modules


# --- 3. nothing is unpickled ---

@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything calls torch.load (pickle) while it runs."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    return calls


def pickle_only_lm(directory: Path) -> Path:
    copy_model("tiny-arith", directory)
    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


@pytest.mark.slow  # runs the suggested conversion in a fresh interpreter
def test_pickle_only_model_is_refused_with_a_working_conversion_command(tmp_path, no_torch_load):
    model = pickle_only_lm(tmp_path / "model")
    code, out, err = rlgen("sample", "--model", model, "--task", "arithmetic", "--limit", "1")
    line = assert_one_line_error(code, out, err, "pytorch_model.bin", "never loads", "trust", "safe_serialization=True")
    assert not no_torch_load
    command = line.split("convert it once with: ", 1)[1]
    proc = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert (model / "model.safetensors").is_file()


def test_pickle_only_reward_model_is_refused(tmp_path, no_torch_load):
    from rlgen.models.reward_model import load_reward_model

    model = pickle_only_lm(tmp_path / "rm")
    with pytest.raises(RlgenError, match=r"pytorch_model.bin: weights stored only as a pickle.*AutoModelForSequenceClassification"):
        load_reward_model(model)
    edit_json(model / "config.json", architectures=None)
    (model / "rlgen_reward_model.json").write_text(json.dumps({"head": "value-head"}))
    with pytest.raises(RlgenError, match=r"pytorch_model.bin: weights stored only as a pickle"):
        load_reward_model(model)


def lora_adapter(directory: Path, base: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, directory / name)
    return directory


def test_pickle_only_adapter_is_refused(tmp_path, no_torch_load):
    from rlgen.models.safe_load import load_peft_adapter

    base = resolve_model_path("tiny-arith")
    adapter = lora_adapter(tmp_path / "adapter", base)
    assert type(load_model(adapter)).__name__ == "PeftModelForCausalLM"  # the safetensors adapter loads
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")  # what older peft versions wrote
    for load in (lambda: load_model(adapter), lambda: load_peft_adapter(load_model(base), adapter, is_trainable=True)):
        with pytest.raises(RlgenError, match=r"adapter_model.bin: weights stored only as a pickle.*save_file"):
            load()


def test_pickle_only_diffusers_component_is_refused(tmp_path, no_torch_load):
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model

    model = copy_model("tiny-digits", tmp_path / "pipe")
    unet = model / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    with pytest.raises(RlgenError, match=r"unet/diffusion_pytorch_model.bin: weights stored only as a pickle.*diffusers.UNet2DModel"):
        load_diffusion_model(DiffusionModelConfig(path=str(model)))


# --- 4. nothing is downloaded ---

NETWORK_FENCE = textwrap.dedent("""\
    import socket, sys
    def _refuse(*args, **kwargs):
        sys.stderr.write("NETWORK ATTEMPT\\n")
        raise OSError("network disabled by the test")
    socket.socket.connect = _refuse
    socket.getaddrinfo = _refuse
    socket.create_connection = _refuse
    """)


@pytest.mark.slow  # a fresh interpreter
def test_adapter_naming_a_hub_base_fails_at_once_without_network(tmp_path):
    base = resolve_model_path("tiny-arith")
    adapter = lora_adapter(tmp_path / "adapter", base)
    shutil.copy(base / "config.json", adapter / "config.json")
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="someorg/somemodel")
    proc = run_rlgen(["sample", "--model", adapter, "--task", "arithmetic", "--limit", "1"], tmp_path,
                     env_drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), prelude=NETWORK_FENCE)
    assert "NETWORK ATTEMPT" not in proc.stderr
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "adapter_config.json",
                          "base_model_name_or_path", "someorg/somemodel", "never downloads")


# --- 17. tokenizers without usable special tokens ---

def test_tokenizer_without_eos_or_pad_is_named(tmp_path):
    model = copy_model("tiny-arith", tmp_path / "model")
    edit_json(model / "tokenizer_config.json", eos_token=None, pad_token=None)
    edit_json(model / "config.json", eos_token_id=None, pad_token_id=None)
    with pytest.raises(RlgenError, match=rf"tokenizer of {model} has no usable EOS or pad token"):
        load_tokenizer(model)


def test_tokenizer_without_eos_takes_the_model_configs(tmp_path):
    model = copy_model("tiny-arith", tmp_path / "model")
    edit_json(model / "tokenizer_config.json", eos_token=None, pad_token=None)
    tokenizer = load_tokenizer(model)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<eos>", 2)  # config.json: eos_token_id = 2
    assert tokenizer.pad_token_id == 2


def test_pad_id_outside_the_vocabulary_becomes_eos(tmp_path):
    model = copy_model("tiny-arith", tmp_path / "model")
    edit_json(model / "tokenizer_config.json", pad_token="<invented-pad>")  # added as id 99 = vocab_size
    tokenizer = load_tokenizer(model)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 99
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


# --------------------------------------------------------------------------- rlgen merge
ARITH = REPO / "rlgen" / "builtin_models" / "tiny-arith"
SECRET = "TOP-SECRET-CONTENTS"




def no_output(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of tiny-arith the test may make hostile."""
    return Path(shutil.copytree(ARITH, tmp_path / "model"))


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


# --------------------------------------------------------------------------- item 6: files of the model dir

def test_a_symlinked_tokenizer_file_pointing_outside_is_refused(tmp_path, model, secret):
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to(secret)
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "tokenizer_config.json" in err and "outside the model directory" in err
    assert no_output(tmp_path)


@pytest.fixture
def small_files():
    """Files this process writes are capped at 64 MB (a regression streams /dev/zero until the disk is
    full: with the cap it fails at once)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap raises OSError instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_link_to_dev_zero_or_a_fifo_is_refused_without_reading_it(tmp_path, model, small_files):
    (model / "special_tokens_map.json").symlink_to("/dev/zero")
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "special_tokens_map.json" in err and "refused" in err
    (model / "special_tokens_map.json").unlink()
    os.mkfifo(model / "added_tokens.json")  # opening it for reading would block forever
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "added_tokens.json" in err and "not a regular file" in err
    assert no_output(tmp_path)


def test_a_symlinked_folder_is_refused(tmp_path, model, secret):
    (model / "extra").symlink_to(secret.parent, target_is_directory=True)
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "extra" in err and "symbolic link to a folder" in err
    assert no_output(tmp_path)


def test_links_inside_the_model_dir_and_the_hf_cache_layout_are_followed(tmp_path):
    """A Hugging Face cache snapshot is links into ../../blobs: merging it still works."""
    repo = tmp_path / "models--x--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for item in ARITH.iterdir():
        shutil.copy(item, blobs / f"blob-{item.name}")
        (snapshot / item.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{item.name}")
    out = tmp_path / "out"
    rlgen_ok("merge", snapshot, "tiny-arith", "--out", out, "--quiet")
    assert not (out / "config.json").is_symlink()
    assert (out / "config.json").read_bytes() == (ARITH / "config.json").read_bytes()
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(ARITH / "model.safetensors"))
    assert all(torch.equal(merged[k], base[k]) for k in base)


def sharded(model: Path) -> dict:
    """Split the model's weights into two shards with an index; the index (as a dict)."""
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(model / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    return {"metadata": {}, "weight_map": weight_map}


def test_shard_index_paths_must_stay_inside_the_model_dir(tmp_path, model):
    index = sharded(model)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model / "model-00002-of-00002.safetensors", outside)
    for name in ("../elsewhere.safetensors", str(outside)):
        index["weight_map"] = {k: (name if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
        assert "model.safetensors.index.json" in err and "outside the model directory" in err
    assert no_output(tmp_path)


def test_a_weights_file_linking_outside_is_refused(tmp_path, model):
    outside = tmp_path / "other.safetensors"
    shutil.move(model / "model.safetensors", outside)
    (model / "model.safetensors").symlink_to(outside)
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "model.safetensors" in err and "outside the model directory" in err
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    err = run_error(model, "tiny-arith", "--out", tmp_path / "out")
    assert "model.safetensors" in err and "not a regular file" in err
    assert no_output(tmp_path)


# --------------------------------------------------------------------------- item 7: YAML bombs

def billion_laughs(path: Path) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines += ["merge_method: linear", "models: [{model: *a9}]"]  # 9**10 strings once expanded
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    return path


@pytest.mark.slow  # a fresh interpreter
def test_yaml_alias_bomb_fails_fast_in_little_memory(tmp_path):
    bomb = billion_laughs(tmp_path / "bomb.yml")
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the old code printed gigabytes
        from rlgen.cli.app import main
        main(["merge", "--config", {str(bomb)!r}, "--out", {str(tmp_path / 'out')!r}, "--quiet"])
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "bomb.yml: bad YAML" in proc.stderr
    assert "billion laughs" in proc.stderr and len(proc.stderr) < 500
    assert time.monotonic() - started < 60
    assert no_output(tmp_path)


def test_deep_nesting_and_recursive_aliases_are_one_line(tmp_path):
    cases = {"deep.yml": "merge_method: " + "[" * 5000 + "]" * 5000 + "\n",
             "deep.toml": "merge_method = " + "[" * 5000 + "]" * 5000 + "\n",
             "loop.yml": "merge_method: linear\nmodels: &m [*m]\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        err = run_error("--config", tmp_path / name, "--out", tmp_path / "out")
        assert name in err and ("nested" in err or "recursive" in err), err
    assert no_output(tmp_path)


def test_error_messages_show_at_most_about_200_characters_of_a_value(tmp_path):
    config = tmp_path / "long.yml"
    config.write_text("merge_method: linear\nmodels: [{model: tiny-arith, parameters: {weight: [1, " +
                      ", ".join(["{a: 1}"] * 5000) + "]}}]\n")  # neither a gradient nor a filter list
    err = run_error("--config", config, "--out", tmp_path / "out")
    assert "models[0].parameters.weight" in err and len(err) < 600, len(err)


# --------------------------------------------------------------------------- item 13: stale temp dirs

def fake_stale_temp(parent: Path, name: str, marker: bytes | None = b"rlgen merge, pid 1\n") -> Path:
    tmp = parent / f".{name}.ab12cd_9.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 64)
    if marker is not None:
        (tmp / ".rlgen-merge.lock").write_bytes(marker)
    return tmp


def test_the_next_merge_removes_stale_temp_dirs_and_nothing_else(tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    stale = fake_stale_temp(parent, "old-merge")
    not_ours = fake_stale_temp(parent, "other", marker=None)  # same name pattern, no marker
    foreign = fake_stale_temp(parent, "foreign", marker=b"someone else's\n")
    held = fake_stale_temp(parent, "running")  # a merge still running holds the lock
    import fcntl

    with open(held / ".rlgen-merge.lock", "rb") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        rlgen_ok("merge", "tiny-arith", "tiny-arith", "--out", parent / "merged", "--quiet")
        assert held.is_dir()
    assert not stale.exists()
    assert not_ours.is_dir() and foreign.is_dir()
    assert (parent / "merged" / "model.safetensors").is_file()
    assert not (parent / "merged" / ".rlgen-merge.lock").exists()


@pytest.mark.slow  # a fresh interpreter
def test_a_killed_merge_leaves_a_temp_dir_that_the_next_merge_removes(tmp_path):
    parent = tmp_path / "outs"
    script = textwrap.dedent(f"""
        import time
        from rlgen.merging import safetensors_io
        original = safetensors_io.ShardedWriter.write
        def slow_write(self, name, tensor):
            original(self, name, tensor)
            time.sleep(600)  # killed here, mid-merge
        safetensors_io.ShardedWriter.write = slow_write
        from rlgen.cli.app import main
        main(["merge", "tiny-arith", "tiny-arith", "--out", {str(parent / 'a')!r}, "--quiet"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            temps = [p for p in parent.iterdir() if p.name.startswith(".a.")] if parent.is_dir() else []
            if temps and (temps[0] / "model.safetensors").exists():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the merge never started writing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in parent.iterdir()] == [temps[0].name]
    rlgen_ok("merge", "tiny-arith", "tiny-arith", "--out", parent / "b", "--quiet")
    assert sorted(p.name for p in parent.iterdir()) == ["b"]


# --------------------------------------------------------------------------- item 18: truncated inputs

@pytest.mark.slow  # a fresh interpreter
def test_an_input_truncated_during_the_merge_is_one_line_not_sigbus(tmp_path):
    other = Path(shutil.copytree(ARITH, tmp_path / "other"))
    script = textwrap.dedent(f"""
        import os
        from rlgen.merging import safetensors_io
        original = safetensors_io.ShardedWriter.write
        def write_then_truncate(self, name, tensor):
            original(self, name, tensor)
            path = {str(other / 'model.safetensors')!r}
            os.truncate(path, os.path.getsize(path) // 2)  # another process cuts the input short
        safetensors_io.ShardedWriter.write = write_then_truncate
        from rlgen.cli.app import main
        main(["merge", "tiny-arith", {str(other)!r}, "--out", {str(tmp_path / 'out')!r}, "--quiet"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # -7 (SIGBUS) before the fix
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated while being read" in lines[0] and "model.safetensors" in lines[0]
    assert no_output(tmp_path)


def test_an_input_truncated_before_the_merge_is_one_line(tmp_path):
    other = Path(shutil.copytree(ARITH, tmp_path / "other"))
    path = other / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    err = run_error("tiny-arith", other, "--out", tmp_path / "out")
    assert "model.safetensors" in err and "file size" in err
    assert no_output(tmp_path)


# --- an adapter saved by peft alone (no tokenizer files) takes its base's tokenizer (review round 2) ---

def test_adapter_without_tokenizer_files_uses_the_base_tokenizer(tmp_path):
    base = resolve_model_path("tiny-arith")
    adapter = lora_adapter(tmp_path / "adapter", base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()  # as peft's save_pretrained writes it
    assert load_tokenizer(adapter).encode("1+2=") == load_tokenizer(base).encode("1+2=")
    out = rlgen_ok("sample", "--model", adapter, "--task", "arithmetic", "--limit", 1, "--quiet", "--max-new-tokens", 4).out
    assert json.loads(out.splitlines()[0])["prompt"]


def test_adapter_without_tokenizer_files_naming_a_hub_base_fails_naming_the_key(tmp_path):
    base = resolve_model_path("tiny-arith")
    adapter = lora_adapter(tmp_path / "adapter", base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="someorg/somemodel")
    with pytest.raises(RlgenError, match=r"adapter_config.json: key 'base_model_name_or_path' is 'someorg/somemodel'"):
        load_tokenizer(adapter)
    code, out, err = rlgen("sample", "--model", adapter, "--task", "arithmetic", "--limit", "1")
    assert_one_line_error(code, out, err, "adapter_config.json", "base_model_name_or_path", "never downloads")
