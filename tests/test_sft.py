"""Tests for gptforge.sft, the chat template and data.conversations: the template's ids and loss mask on real
tokenizers, rows that never mix conversations, exact resume (full and LoRA), 2 gloo processes equal to 1,
the LoRA export equal to base + adapters in transformers, and every bad input a one-line error.

    .venv/bin/python -m pytest tests/test_sft.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_run

from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import load_checkpoint
from gptforge.cli import main
from gptforge.data.conversations import IGNORE, Conversations
from gptforge.metrics import read_metrics
from gptforge.runs import adapted_model, load_run
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer

WORDS = ["thee", "thou", "lord", "king", "good", "fair", "love", "night", "heart", "sweet", "death", "time"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse king"},
                {"role": "assistant", "content": "gnik"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def reverse_tasks(words: list[str], repeat: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"reverse {w}"},
                          {"role": "assistant", "content": w[::-1]}]}
            for w in words * repeat]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("sft-base"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("tasks") / "train.jsonl", reverse_tasks(WORDS))


def sft(base: Path, data: Path, out: Path, *args: str) -> int:
    return main(["sft", f"--init_from={base}", f"--data={data}", f"--out_dir={out}", "--device=cpu",
                 "--batch_size=4", "--eval_interval=5", "--eval_iters=2", "--max_iters=10",
                 "--warmup_iters=2", "--lr_decay_iters=10", "--learning_rate=1e-3", *args])


def step_losses(out: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


# -- the template --

@pytest.mark.parametrize("tokenizer", [CharTokenizer("".join(sorted(set("Be brief.reverse kingaDgn")))),
                                       GPT2Tokenizer()], ids=["char", "gpt2"])
def test_the_template_renders_markers_after_the_vocabulary_and_targets_only_the_assistant(tokenizer):
    template = ChatTemplate.for_tokenizer(tokenizer)
    v = tokenizer.vocab_size
    assert (template.system, template.user, template.assistant, template.end) == (v, v + 1, v + 2, v + 3)
    ids, targets = template.render(tokenizer, CONVERSATION)
    expected = [v, *tokenizer.encode("Be brief."), v + 3, v + 1, *tokenizer.encode("reverse king"), v + 3,
                v + 2, *tokenizer.encode("gnik"), v + 3]
    assert ids == expected
    answer = len(tokenizer.encode("gnik")) + 1  # the assistant's content and its end marker
    assert targets == [False] * (len(ids) - answer) + [True] * answer
    text = ChatTokenizer(tokenizer, template).decode(ids)
    assert text == "<|system|>Be brief.<|end|><|user|>reverse king<|end|><|assistant|>gnik<|end|>"
    prompt, _ = template.render(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == expected[: len(prompt)] and prompt[-1] == template.assistant
    assert ChatTemplate.from_spec(template.spec()) == template


def test_rows_are_one_conversation_each_and_padding_never_reaches_the_loss(tmp_path):
    tokenizer = CharTokenizer("".join(sorted(set("reverse kingthou"))))
    template = ChatTemplate.for_tokenizer(tokenizer)
    data = write_jsonl(tmp_path / "c.jsonl", reverse_tasks(["king", "thou"], repeat=1))
    conversations = Conversations.read(str(data), tokenizer, template, block_size=32)
    x, y = conversations.rows([0, 1], 32)
    for row in range(2):
        ids, targets = conversations.ids[row], conversations.targets[row]
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1].tolist()
        assert (y[row, n:] == IGNORE).all()  # padding is never a target
        learned = y[row, :n] != IGNORE
        assert learned.tolist() == targets[1:].tolist()
        assert y[row, :n][learned].tolist() == ids[1:][targets[1:]].tolist()
    # a gradient test: the loss of one row depends on no other row, nor on anything after its conversation
    from gptforge import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=template.vocab_size))
    embeddings = model.transformer.wte(x).detach().requires_grad_(True)
    model.transformer.wte = torch.nn.Identity()  # feed the embeddings themselves, to take their gradient
    logits = model.head(model.transformer.ln_f(model.transformer.h[0](embeddings + model.transformer.wpe(
        torch.arange(32)))))
    row_loss = torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=IGNORE)
    (grad,) = torch.autograd.grad(row_loss, embeddings)
    n = len(conversations.ids[0]) - 1
    assert grad[1].abs().max() == 0 and grad[0, n:].abs().max() == 0 and grad[0, :n].abs().max() > 0


# -- training --

def test_sft_learns_and_resumes_bit_identical(base, tasks, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert sft(base, tasks, whole) == 0
    out = capsys.readouterr().out
    assert "the chat template's markers need ids" in out and "grows to" in out
    losses = step_losses(whole)
    assert losses[9] < losses[0]
    assert sft(base, tasks, part, "--max_iters=5") == 0
    assert main(["sft", "--init_from=resume", f"--out_dir={part}", "--max_iters=10"]) == 0
    assert step_losses(part) == losses
    a, b = load_checkpoint(whole)["model"], load_checkpoint(part)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(whole)["chat_template"]["end"] == load_run(base).model.config.vocab_size + 3


def test_lora_trains_only_adapters_resumes_and_exports_merged(base, tasks, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert sft(base, tasks, whole, "--lora_rank=4", "--lora_targets=c_attn,c_fc") == 0
    assert "of" in capsys.readouterr().out  # the trainable-parameter report
    ckpt = load_checkpoint(whole)
    assert set(ckpt["model"]) == {k for k in ckpt["model"] if ".lora_" in k} and ckpt["model"]
    assert ckpt["sft"]["base"] == str(base) and len(ckpt["sft"]["base_sha256"]) == 64
    assert sft(base, tasks, part, "--lora_rank=4", "--lora_targets=c_attn,c_fc", "--max_iters=5") == 0
    assert main(["sft", "--init_from=resume", f"--out_dir={part}", "--max_iters=10"]) == 0
    assert step_losses(part) == step_losses(whole)
    # the export merges the adapters: transformers' logits equal base + adapters'
    assert main(["export", f"--out_dir={whole}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    adapted = adapted_model(ckpt).eval()
    idx = torch.randint(0, adapted.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, adapted(idx, idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_finetune_as_one(base, tasks, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert sft(base, tasks, single, "--gradient_accumulation_steps=2") == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "gptforge", "sft", f"--init_from={base}", f"--data={tasks}", f"--out_dir={multi}",
               "--device=cpu", "--batch_size=4", "--eval_interval=5", "--eval_iters=2", "--max_iters=10",
               "--warmup_iters=2", "--lr_decay_iters=10", "--learning_rate=1e-3",
               "--gradient_accumulation_steps=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = step_losses(single), step_losses(multi)
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) for k in a) < 1e-5


# -- bad input: one line naming the file and line, nothing written --

BAD = [
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"], "{file}:1: the conversation has no "
                                                                      "assistant turn"),
    (["{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": "
      "\"x\"}]}"], "{file}:1: unknown role 'wizard'"),
    (["not json"], "{file}:1: not a JSON line"),
    (["{\"prompt\": \"x\"}"], "{file}:1: neither"),
    ([json.dumps(reverse_tasks(["king"], 1)[0]),
      json.dumps({"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "x"}]})],
     "{file}:2: character 'é'"),
    ([json.dumps({"messages": [{"role": "user", "content": "reverse " * 40},
                               {"role": "assistant", "content": "x"}]})], "has no conversation that fits"),
]


@pytest.mark.parametrize(("lines", "message"), BAD)
def test_bad_conversations_are_one_line_errors_and_write_nothing(base, tmp_path, capsys, lines, message):
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    assert sft(base, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(file=data) in err, err
    assert not (tmp_path / "out").exists()


def test_too_long_conversations_are_dropped_and_counted(base, tasks, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "reverse " * 40}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [*reverse_tasks(WORDS, 2), long, long])
    assert sft(base, data, tmp_path / "out", "--max_iters=1") == 0
    assert "2 train conversation(s) longer than block_size=32 dropped" in capsys.readouterr().out


def test_missing_options_and_data_are_one_line_errors(base, tmp_path, capsys):
    assert main(["sft", f"--out_dir={tmp_path / 'o'}", "--data=x.jsonl"]) == 2
    assert "name the base model" in capsys.readouterr().err
    assert main(["sft", f"--init_from={base}", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "name the conversations" in capsys.readouterr().err
    assert main(["sft", f"--init_from={base}", "--data=missing.jsonl", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "--data=missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_hf_export_of_an_assistant_renders_its_template_in_transformers(base, tasks, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    assert sft(base, tasks, run, "--max_iters=2") == 0
    assert main(["export", f"--out_dir={run}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    mine = load_run(run)
    conversation = [{"role": "user", "content": "reverse king"}, {"role": "assistant", "content": "gnik"}]
    ids, _ = mine.chat_template.render(mine.tokenizer, conversation)
    assert hf.apply_chat_template(conversation, tokenize=True, return_dict=False) == ids
    prompt, _ = mine.chat_template.render(mine.tokenizer, conversation[:1], add_generation_prompt=True)
    assert hf.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == prompt
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == mine.chat_template.end  # an answer ends at its end-of-turn marker
    # and gptforge reads its own export back as an assistant
    assert main(["sample", f"--init_from={tmp_path / 'hf'}", "--num_samples=1", "--max_new_tokens=4",
                 "--device=cpu"]) == 0


def test_a_bpe_base_finetunes_and_its_run_needs_no_dataset_directory(tmp_path):
    from tiny_run import SONNET

    from gptforge.config import TrainConfig
    from gptforge.data.prepare import TextOptions, get_dataset
    from gptforge.train import train

    (tmp_path / "sonnet.txt").write_text(SONNET * 20, encoding="utf-8")
    get_dataset("text").prepare(TextOptions(input=str(tmp_path / "sonnet.txt"), tokenizer="bpe",
                                            vocab_size=300, data_dir=str(tmp_path / "data"), name="bpe",
                                            num_proc=1))
    train(TrainConfig(dataset="bpe", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "base"),
                      n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=2,
                      gradient_accumulation_steps=1, max_iters=2, eval_interval=2, eval_iters=1, device="cpu",
                      compile=False))
    data = write_jsonl(tmp_path / "c.jsonl", reverse_tasks(WORDS, 2))
    assert sft(tmp_path / "base", data, tmp_path / "run", "--max_iters=4", "--eval_interval=2") == 0
    shutil.rmtree(tmp_path / "data")  # the finetuned run carries its tokenizer
    assert main(["sft", "--init_from=resume", f"--out_dir={tmp_path / 'run'}", "--max_iters=6"]) == 0
    run = load_run(tmp_path / "run")
    ids, _ = run.chat_template.render(run.tokenizer, reverse_tasks(["king"], 1)[0]["messages"])
    assert run.tokenizer.decode(ids) == "<|user|>reverse king<|end|><|assistant|>gnik<|end|>"


def test_a_lora_run_reads_back_at_the_context_it_trained(base, tasks, tmp_path):
    run = tmp_path / "run"
    assert sft(base, tasks, run, "--max_iters=2", "--lora_rank=2", "--block_size=24") == 0
    assert load_run(run).model.config.block_size == 24 == load_checkpoint(run)["config"]["block_size"]


@pytest.mark.parametrize("args", [["--learning_rate=0"], ["--min_lr=-1"]])
def test_a_learning_rate_of_zero_is_a_one_line_error(base, tasks, tmp_path, capsys, args):
    assert sft(base, tasks, tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learning_rate must be positive" in err
