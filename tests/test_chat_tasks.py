"""Tests of examples/chat_tasks.py, the generator of `make chat-demo`'s word tasks: the same lines for a seed,
held-out words that train never contains, every line a conversation gptforge reads, and only characters of the
shakespeare_char vocabulary, so the quick start's model can be finetuned on them.

    .venv/bin/python -m pytest -q tests/test_chat_tasks.py
"""

import collections
import importlib.util
import json
from pathlib import Path

import pytest
from mirror_data import SHAKESPEARE
from tiny_run import tiny_run

from gptforge.chat_template import ChatTemplate
from gptforge.data.conversations import to_messages
from gptforge.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("chat_tasks", REPO / "examples" / "chat_tasks.py")
chat_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chat_tasks)


def write(out: Path, seed: int = 0, n_train: int = 600, n_val: int = 200) -> tuple[list[str], list[str]]:
    chat_tasks.main([f"--out={out}", f"--n_train={n_train}", f"--n_val={n_val}", f"--seed={seed}", "--run="])
    return [(out / f"{split}.jsonl").read_text().splitlines() for split in ("train", "val")]


def words_of(lines: list[str]) -> set[str]:
    """The words each line's prompt asks about."""
    return {w for line in lines for w in json.loads(line)["messages"][0]["content"].split(": ", 1)[1].split()}


def test_same_seed_same_lines_other_seed_others(tmp_path):
    first, again, other = write(tmp_path / "a"), write(tmp_path / "b"), write(tmp_path / "c", seed=1)
    assert first == again
    assert first != other
    assert [len(lines) for lines in first] == [600, 200]
    assert len(set(first[1])) == 200  # no held-out conversation twice


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_val_words_never_in_train(tmp_path, seed):
    train, val = write(tmp_path, seed=seed, n_train=3000)
    train_words, val_words = chat_tasks.split_words(seed, 0.2)
    assert not set(train_words) & set(val_words)
    assert words_of(train) <= set(train_words)
    assert words_of(val) <= set(val_words)
    assert not words_of(train) & words_of(val)


def test_every_line_a_conversation_with_the_right_answer(tmp_path):
    answer = {"reverse": lambda w: w[0][::-1], "upper": lambda w: w[0].upper(), "spell": " ".join,
              "first": lambda w: w[0][0], "last": lambda w: w[0][-1], "copy": " ".join}
    for split, lines in zip(("train", "val"), write(tmp_path), strict=True):
        seen = collections.Counter()
        for number, line in enumerate(lines, 1):
            messages = to_messages(json.loads(line), f"{split}.jsonl:{number}")
            assert [m["role"] for m in messages] == ["user", "assistant"]
            task = chat_tasks.task_of(messages)
            words = messages[0]["content"].split(": ", 1)[1].split()
            if task == "spell":
                words = list(words[0])
            assert messages[1]["content"] == answer[task](words), line
            seen[task] += 1
        assert set(seen) == set(chat_tasks.TASKS)
    assert set(seen.values()) == {200 // 6, 200 // 6 + 1}  # val: as many of each task, give or take one


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"no tinyshakespeare at {SHAKESPEARE}")
def test_only_shakespeare_char_vocabulary_and_the_quick_start_context(tmp_path):
    tokenizer = CharTokenizer.from_text([SHAKESPEARE.read_text(encoding="utf-8")])
    assert tokenizer.vocab_size == 65
    template = ChatTemplate.for_tokenizer(tokenizer)
    for lines in write(tmp_path, n_train=3000):
        for line in lines:
            messages = json.loads(line)["messages"]
            assert set("".join(m["content"] for m in messages)) <= set(tokenizer.chars)
            ids, _ = template.render(tokenizer, messages)  # encodes, or raises naming the character
            assert len(ids) <= 36 + 1  # fits make chat-demo's --block_size=36, let alone the base's 64
    assert set("".join(chat_tasks.WORDS)) <= set(tokenizer.chars)


def test_a_run_whose_vocabulary_lacks_a_character_fails_loudly(tmp_path, capsys):
    run = tiny_run(tmp_path)  # a sonnet's characters: no 'j', 'q', 'x' or 'z', few capitals
    with pytest.raises(SystemExit, match="is not in this char tokenizer"):
        chat_tasks.main([f"--out={tmp_path / 'tasks'}", "--n_train=200", "--n_val=50", f"--run={run}"])
    assert not (tmp_path / "tasks").exists()  # nothing written
    with pytest.raises(SystemExit, match="holds no run"):
        chat_tasks.main([f"--out={tmp_path / 'tasks'}", f"--run={tmp_path / 'nowhere'}"])
