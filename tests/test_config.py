"""Tests for gptforge.config: TrainConfig from TOML files and nanoGPT's own config/*.py files (copies in
tests/fixtures/nanogpt_config), the shipped configs/, the one-line errors for what a user gets wrong, and the
model keys: every GPTConfig field reaches training, resume, bench and the HF export.

    .venv/bin/python -m pytest tests/test_config.py
"""

import dataclasses
import os
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tiny_run import char_dataset

from gptforge import GPT, GPTConfig
from gptforge.bench import BenchOptions, train_config
from gptforge.config import TrainConfig, load_train_config, read_nanogpt_config
from gptforge.distributed import Dist
from gptforge.errors import GptforgeError
from gptforge.hf import ARCHITECTURE_OPTIONS
from gptforge.model import MODEL_KEYS
from gptforge.options import split_args
from gptforge.train import Trainer, train

# ------------------------------------------------------------------------------------------------------------
# TrainConfig from files: nanoGPT's own configs, the shipped TOML files, and the errors a user can make.

REPO = Path(__file__).resolve().parents[1]
NANOGPT = REPO / "tests" / "fixtures" / "nanogpt_config"
CONFIGS = REPO / "configs"

# nanoGPT README's CPU quick start: train_shakespeare_char.py with these options.
QUICKSTART_OPTIONS = (
    "--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 "
    "--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
)

EVAL = dict(batch_size=8, eval_iters=500, eval_only=True, wandb_log=False)
NANOGPT_VALUES = {
    "train_gpt2.py": dict(
        wandb_log=True, wandb_project="owt", wandb_run_name="gpt2-124M", batch_size=12, block_size=1024,
        gradient_accumulation_steps=40, max_iters=600000, lr_decay_iters=600000, eval_interval=1000,
        eval_iters=200, log_interval=10, weight_decay=0.1,
    ),
    "train_shakespeare_char.py": dict(
        out_dir="out-shakespeare-char", eval_interval=250, eval_iters=200, log_interval=10,
        always_save_checkpoint=False, wandb_log=False, wandb_project="shakespeare-char",
        wandb_run_name="mini-gpt", dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=64,
        block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, learning_rate=1e-3, max_iters=5000,
        lr_decay_iters=5000, min_lr=1e-4, beta2=0.99, warmup_iters=100,
    ),
    "finetune_shakespeare.py": dict(
        out_dir="out-shakespeare", eval_interval=5, eval_iters=40, wandb_log=False,
        wandb_project="shakespeare", dataset="shakespeare", init_from="gpt2-xl", always_save_checkpoint=False,
        batch_size=1, gradient_accumulation_steps=32, max_iters=20, learning_rate=3e-5, decay_lr=False,
    ),
    "eval_gpt2.py": dict(EVAL, init_from="gpt2"),
    "eval_gpt2_medium.py": dict(EVAL, init_from="gpt2-medium"),
    "eval_gpt2_large.py": dict(EVAL, init_from="gpt2-large"),
    "eval_gpt2_xl.py": dict(EVAL, init_from="gpt2-xl"),
}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", sorted(NANOGPT_VALUES))
def test_nanogpt_configs_load_as_nanogpt_sets_them(name):
    path = str(NANOGPT / name)
    if name == "finetune_shakespeare.py":
        # `import time` is skipped silently; the run name computed from the clock is skipped with a warning.
        with pytest.warns(UserWarning,
                          match=r":8: skipped wandb_run_name = 'ft-' \+ str\(time\.time\(\)\)") as w:
            cfg = load_train_config([path], {})
        assert len(w) == 1
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cfg = load_train_config([path], {})
    assert cfg == TrainConfig(**NANOGPT_VALUES[name])
    assert type(cfg.gradient_accumulation_steps) is int and type(cfg.learning_rate) is float


def test_train_gpt2_takes_arithmetic_and_the_documented_values():
    cfg = load_train_config([str(NANOGPT / "train_gpt2.py")], {})
    assert (cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps, cfg.max_iters) == (
        12, 1024, 40, 600000)
    # The keys the file leaves out keep nanoGPT's train.py defaults.
    assert (cfg.n_layer, cfg.learning_rate, cfg.warmup_iters, cfg.min_lr, cfg.dataset) == (
        12, 6e-4, 2000, 6e-5, "openwebtext")


# Each shipped TOML file: the nanoGPT config and command-line options it stands for, and the keys it may set
# where nanoGPT computes them (a run name from the clock) or hard-codes them (its model's exact GELU).
SHIPPED = {
    "train_gpt2.toml": ("train_gpt2.py", "", {}),
    "train_shakespeare_char.toml": ("train_shakespeare_char.py", "", {"gelu_approximate": "none"}),
    "finetune_shakespeare.toml": ("finetune_shakespeare.py", "", {"wandb_run_name": "ft-shakespeare"}),
    "eval_gpt2.toml": ("eval_gpt2.py", "", {}),
    "eval_gpt2_medium.toml": ("eval_gpt2_medium.py", "", {}),
    "eval_gpt2_large.toml": ("eval_gpt2_large.py", "", {}),
    "eval_gpt2_xl.toml": ("eval_gpt2_xl.py", "", {}),
    "quickstart_cpu.toml": ("train_shakespeare_char.py", QUICKSTART_OPTIONS, {"gelu_approximate": "none"}),
}


def test_every_shipped_config_is_checked():
    # the speedrun presets have no nanoGPT equivalent: tests/test_speedrun_configs.py checks them
    nanogpt_equivalents = [p.name for p in CONFIGS.glob("*.toml") if not p.name.startswith("speedrun_")]
    assert sorted(nanogpt_equivalents) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_toml_equals_nanogpt(name):
    py, options, own = SHIPPED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finetune_shakespeare.py's run name, checked above
        positional, overrides = split_args(options.split())
        expected = load_train_config([str(NANOGPT / py)], overrides)
    assert not positional
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_train_config([str(CONFIGS / name)], {})
    assert cfg == dataclasses.replace(expected, **own)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_toml_says_what_it_is_and_how_to_run_it(name):
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert f"gptforge train configs/{name}" in text.split("\n\n")[0]  # in the opening comment


def test_quickstart_is_nanogpts_cpu_command():
    cfg = load_train_config([str(CONFIGS / "quickstart_cpu.toml")], {})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (4, 4, 128, 64, 12)
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.dropout, cfg.eval_iters, cfg.log_interval) == (
        2000, 2000, 0, 20, 1)
    assert (cfg.out_dir, cfg.eval_interval, cfg.gradient_accumulation_steps) == (
        "out-shakespeare-char", 250, 1)
    assert (cfg.learning_rate, cfg.warmup_iters, cfg.min_lr, cfg.beta2) == (1e-3, 100, 1e-4, 0.99)
    assert (cfg.device, cfg.compile, cfg.dataset) == ("cpu", False, "shakespeare_char")


def test_files_apply_in_order_then_options():
    cfg = load_train_config([str(CONFIGS / "train_shakespeare_char.toml"), str(NANOGPT / "eval_gpt2.py")],
                            {"max_iters": "1e4", "batch_size": "3"})
    assert (cfg.dataset, cfg.init_from, cfg.eval_iters, cfg.max_iters, cfg.batch_size) == (
        "shakespeare_char", "gpt2", 500, 10000, 3)
    assert type(cfg.max_iters) is int


def test_toml_tables_are_flattened(tmp_path):
    path = write(tmp_path, "grouped.toml",
                 '[model]\nn_layer = 2\nn_head = 2\n[data]\ndataset = "shakespeare"\n')
    cfg = load_train_config([path], {})
    assert (cfg.n_layer, cfg.n_head, cfg.dataset) == (2, 2, "shakespeare")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "max_itres = 5\n",
         r"unknown option --max_itres in .*bad\.toml \(did you mean --max_iters\?\)"),
        ("bad.toml", "[model]\nn_layr = 4\n",
         r"unknown option --n_layr \(in table \[model\]\) in .*bad\.toml \(did you mean --n_layer\?\)"),
        ("bad.toml", "[model]\n[model.attention]\nn_head = 4\n",
         r"bad\.toml: table \[model\.attention\] is nested too deep"),
        ("bad.toml", "n_layer = 4\n[model]\nn_layer = 6\n",
         r"bad\.toml: n_layer \(in table \[model\]\) is set twice"),
        ("bad.toml", 'max_iters = "many"\n', r"bad\.toml: --max_iters='many' is not an integer"),
        ("bad.toml", 'max_iters = "1e4"\n',  # typed in a file
         r"bad\.toml: --max_iters='1e4' is not an integer"),
        ("bad.toml", "n_layer = 4.5\n", r"bad\.toml: --n_layer=4\.5 is not an integer"),
        ("bad.toml", 'compile = "yes"\n', r"bad\.toml: --compile='yes' is not a bool"),
        ("bad.toml", "learning_rate = true\n", r"bad\.toml: --learning_rate=True is not a number"),
        ("bad.toml", "device = 0\n", r"bad\.toml: --device=0 is not a string"),
        ("bad.toml", 'parallelism = "tp"\n', r"bad\.toml: --parallelism='tp' is not one of 'ddp', 'fsdp'"),
        ("bad.toml", "n_layer = 0\n", r"bad\.toml: --n_layer must be at least 1, got 0"),
        ("bad.toml", "max_iters = \n", r"bad\.toml is not valid TOML: .*line 1"),
        ("bad.toml", "[model\n", r"bad\.toml is not valid TOML"),
        ("bad.py", "use_svd = False\n", r"unknown option --use_svd in .*bad\.py"),
        ("bad.py", "n_layers = 4\n", r"unknown option --n_layers in .*bad\.py \(did you mean --n_layer\?\)"),
        ("bad.py", "batch_size = 'eight'\n", r"bad\.py: --batch_size='eight' is not an integer"),
        ("bad.py", "batch_size =\n", r"bad\.py is not valid Python: .* at line 1"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(GptforgeError, match=message) as e:
        load_train_config([path], {})
    assert "\n" not in str(e.value)


def test_missing_or_unknown_kind_of_file(tmp_path):
    with pytest.raises(GptforgeError,
                       match=r"config file .*nope\.toml does not exist \(shipped configs are in"):
        load_train_config([str(tmp_path / "nope.toml")], {})
    with pytest.raises(GptforgeError, match=r"must be \.toml or a nanoGPT \.py config"):
        load_train_config([write(tmp_path, "c.yaml", "n_layer: 4\n")], {})


def test_nanogpt_files_are_read_never_run(tmp_path):
    path = write(tmp_path, "c.py", (
        '"""a docstring"""\nimport os\nfrom math import pi\n'
        "n_layer = 2 ** 3\nn_embd = 64 * 2\nlearning_rate = 6e-4 / 2\nmin_lr = -(1e-5)\nmax_iters = 10 // 3\n"
        "out_dir = os.system('touch pwned')\n"  # a call: skipped, not made
        "n_head = 10 ** 10 ** 10\n"  # would take forever to compute
        "eval_iters = 1 / 0\n"
        "if True:\n    batch_size = 1\n"
    ))
    with pytest.warns(UserWarning) as w:
        values = read_nanogpt_config(Path(path))
    assert values == dict(n_layer=8, n_embd=128, learning_rate=3e-4, min_lr=-1e-5, max_iters=3)
    messages = [str(m.message) for m in w]
    assert [m.split(": ", 1)[0] for m in messages] == [f"{path}:{n}" for n in (9, 10, 11, 12)]
    assert "skipped out_dir = os.system('touch pwned') (not a literal)" in messages[0]
    assert "not a plain assignment" in messages[3]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_command_line_values_are_parsed_and_coerced():
    cfg = load_train_config([], {"max_iters": "1e4", "learning_rate": "1", "compile": "False",
                                 "device": "cuda:1", "init_from": "gpt2-medium", "dtype": "'bfloat16'"})
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.device, cfg.init_from, cfg.dtype) == (
        10000, 1.0, False, "cuda:1", "gpt2-medium", "bfloat16")
    assert type(cfg.max_iters) is int and type(cfg.learning_rate) is float
    with pytest.raises(GptforgeError, match=r"^--max_iters=None is not an integer$"):
        load_train_config([], {"max_iters": "None"})
    with pytest.raises(GptforgeError, match=r"^unknown option --n_layr \(did you mean --n_layer\?\)$"):
        load_train_config([], {"n_layr": "4"})
    with pytest.raises(GptforgeError, match=r"^--dropout must be in \[0, 1\), got 1\.5$"):
        load_train_config([], {"dropout": "1.5"})


def gptforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_cli_config_errors_are_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "bad.toml", "[model]\nn_layr = 4\n")
    result = gptforge("train", bad, "--max_iters=1e4", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"gptforge train: error: unknown option --n_layr (in table [model]) in {bad} "
        "(did you mean --n_layer?)\n"
    )
    assert result.stdout == "" and not (tmp_path / "out").exists()


# -- the model keys: GPTConfig's fields are the one list; every field reaches training, resume, bench, HF --

SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=16)


def other_value(name: str):
    """A valid value of GPTConfig field `name` other than TrainConfig's default; a field of a new kind fails
    here, loudly, until this test knows how to vary it."""
    f = {f.name: f for f in dataclasses.fields(GPTConfig)}[name]
    default = getattr(TrainConfig(), name)
    if typing.get_origin(f.type) is typing.Literal:
        return next(v for v in typing.get_args(f.type) if v != default)
    if f.type is bool:
        return not default
    if f.type is int:
        return 2 * SMALL[name]
    if f.type == float | None:
        return 30.0
    raise AssertionError(f"teach test_config.other_value to vary GPTConfig.{name} ({f.type})")


def small_config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(**{**SMALL, **changes}, dataset="sonnet", data_dir=str(tmp_path / "data"),
                       out_dir=str(tmp_path / "run"), batch_size=2, gradient_accumulation_steps=1,
                       device="cpu", dtype="float32", compile=False)


@pytest.mark.parametrize("name", MODEL_KEYS)
def test_every_model_key_reaches_training_resume_bench_and_hf_export(tmp_path, name):
    char_dataset(tmp_path / "data")
    value = other_value(name)
    # training from scratch builds the model the options describe
    changed = small_config(tmp_path, **{name: value})
    assert getattr(Trainer(changed, Dist()).raw.config, name) == value
    # the bench's step is the trainer's, with the same key
    bench_cfg = train_config(BenchOptions(**{**SMALL, name: value}), str(tmp_path / "data"), "sonnet")
    assert getattr(bench_cfg, name) == value
    # resuming a run with the key changed is refused, naming it
    train(dataclasses.replace(small_config(tmp_path), max_iters=1, eval_interval=1, eval_iters=1))
    with pytest.raises(GptforgeError, match=rf"cannot resume .*\({name} "):
        Trainer(dataclasses.replace(changed, init_from="resume"), Dist())
    # an HF export is the same function in transformers, or refused naming the option
    torch.manual_seed(0)
    model = GPT(changed.model_config(vocab_size=40)).eval()
    if name in ARCHITECTURE_OPTIONS:
        with pytest.raises(GptforgeError, match=f"{name}={value!r}"):
            model.to_hf(tmp_path / "hf")
        return
    model.to_hf(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-5, rtol=1e-5)
