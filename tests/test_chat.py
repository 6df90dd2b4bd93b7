"""Tests for gptforge.chat: `--prompt` writes exactly the answer (the greedy or seeded continuation of the
rendered conversation, up to its end-of-turn marker), turns are remembered and the oldest forgotten when the
context is full, cut answers are noted, Ctrl-C stops an answer, a terminal session in a pseudo-terminal, and
one-line errors: a base run without a chat template, bad options. A tiny char run finetuned for a few dozen
steps on the CPU stands in for an assistant.

    .venv/bin/python -m pytest tests/test_chat.py
"""

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import DATASET, char_dataset

from gptforge.chat import PROMPT, Chat, ChatOptions, repl
from gptforge.cli import main
from gptforge.config import TrainConfig
from gptforge.generate import decoding_model, stream
from gptforge.options import apply_overrides
from gptforge.sample import Decoder
from gptforge.sft import SFTConfig, sft
from gptforge.source import load_source
from gptforge.train import train

CONTEXT = 64
SYSTEM = "Thou art"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


CONVERSATIONS = [
    [user("Shall I"), assistant("thee")],
    [user("So long"), assistant("lives this")],
    [{"role": "system", "content": SYSTEM}, user("Shall I"), assistant("more lovely")],
    [user("Shall I"), assistant("thee"), user("So long"), assistant("lives this")],
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(a char base run, that base finetuned into an assistant): a few seconds on a CPU."""
    root = tmp_path_factory.mktemp("chat")
    char_dataset(root / "data")
    common = dict(block_size=CONTEXT, gradient_accumulation_steps=1, eval_iters=1, warmup_iters=1,
                  compile=False, device="cpu", dtype="float32", log_interval=100)
    train(TrainConfig(dataset=DATASET, data_dir=str(root / "data"), out_dir=str(root / "base"), n_layer=1,
                      n_head=2, n_embd=32, batch_size=4, max_iters=2, eval_interval=2, lr_decay_iters=2,
                      **common))
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4), encoding="utf-8")
    sft(SFTConfig(init_from=str(root / "base"), data=str(data), val_data=str(data), out_dir=str(root / "sft"),
                  batch_size=8, max_iters=40, eval_interval=40, lr_decay_iters=40, learning_rate=2e-2,
                  **common))
    return root / "base", root / "sft"


@pytest.fixture(scope="module")
def reference(runs):
    """The answer to `messages` without gptforge.chat: the run's template renders them, `generate.stream`
    continues them (greedy, or seeded as `--seed` seeds), and the answer is the text up to the first
    marker."""
    source = load_source(str(runs[1]))
    model = decoding_model(source.model, "cpu", "float32")
    template = source.chat_template
    markers = [template.system, template.user, template.assistant, template.end]

    def answer(messages, max_new_tokens=16, temperature=0.0, seed=None) -> str:
        ids, _ = template.render(source.tokenizer, messages, add_generation_prompt=True)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tokens = []
        for token in stream(model, torch.tensor([ids]), min(max_new_tokens, CONTEXT - len(ids)),
                            temperature=temperature, top_k=200, generator=generator,
                            stop_tokens=[template.end]):
            if int(token[0]) in markers:
                break
            tokens.append(int(token[0]))
        return source.tokenizer.decode(tokens)

    return answer


def options(run: Path, **overrides) -> ChatOptions:
    base = {"out_dir": str(run), "device": "cpu", "temperature": 0, "max_new_tokens": 16}
    return apply_overrides(ChatOptions(), {**base, **overrides})


def test_prompt_writes_exactly_the_greedy_answer(runs, reference, capsys):
    assert main(["chat", f"--out_dir={runs[1]}", "--prompt=Shall I", "--temperature=0", "--device=cpu",
                 "--max_new_tokens=16"]) == 0
    out, err = capsys.readouterr()
    expected = reference([user("Shall I")])
    assert out == expected + "\n" and err == ""  # it ended at its end-of-turn marker: no note
    assert expected and "<|" not in out
    assert main(["chat", f"--out_dir={runs[1]}", "--prompt=Shall I", f"--system={SYSTEM}", "--temperature=0",
                 "--device=cpu", "--max_new_tokens=16"]) == 0
    with_system = reference([{"role": "system", "content": SYSTEM}, user("Shall I")])
    assert capsys.readouterr().out == with_system + "\n"


def test_a_seed_draws_as_sample_does(runs, reference):
    for seed in (1, 2):
        out = io.StringIO()
        Chat(options(runs[1], temperature=0.8, seed=seed)).answer("So long", out)
        assert out.getvalue() == reference([user("So long")], temperature=0.8, seed=seed) + "\n"


def test_turns_are_remembered_and_the_oldest_forgotten_when_the_context_is_full(runs, reference):
    notes = io.StringIO()
    chat = Chat(options(runs[1], system=SYSTEM, max_new_tokens=12), notes)
    system = {"role": "system", "content": SYSTEM}
    forgot = []
    for _ in range(4):  # each turn takes up to 1+7+1 + 1+12+1 = 23 of the 64 positions
        before = list(chat.turns)
        text = chat.answer("Shall I", io.StringIO()).text
        kept = chat.turns[:-1]
        assert kept == before[len(before) - len(kept):]  # the newest turns, in order
        forgot.append(len(before) - len(kept))
        history = [m for question, answer in kept for m in (user(question), assistant(answer))]
        assert text == reference([system, *history, user("Shall I")], max_new_tokens=12)
        assert chat.turns[-1] == ("Shall I", text)
    # the history kept is all that leaves room for an answer of max_new_tokens
    assert forgot[0] == 0 and sum(forgot) >= 1 and chat.system == SYSTEM
    notes = [line for line in notes.getvalue().splitlines() if not line.startswith("[cut")]
    assert notes == [f"[the conversation outgrew the model's {CONTEXT}-token context: forgot its oldest "
                     f"{n} turn{'s' if n > 1 else ''}, kept the system prompt]" for n in forgot if n]


def test_cut_answers_are_noted(runs, reference):
    notes = io.StringIO()
    chat = Chat(options(runs[1], max_new_tokens=2), notes)
    answer = chat.answer("So long", io.StringIO())
    assert answer.ending == "max_new_tokens" and len(answer.text) == 2
    assert notes.getvalue() == "[cut at --max_new_tokens=2]\n"
    long = ("So long as men can breathe or eyes can see, So long lives thi")[:CONTEXT - 4]  # 3 ids of markers
    chat = Chat(options(runs[1], max_new_tokens=50), notes := io.StringIO())
    answer = chat.answer(long, io.StringIO())
    assert answer.ending == "context" and answer.text == reference([user(long)], max_new_tokens=1)
    assert notes.getvalue() == "[cut: the answer reached the end of the model's 64-token context]\n"
    with pytest.raises(Exception, match="this message takes 64 tokens: no room for an answer"):
        chat.answer(long + "e", io.StringIO())


def test_ctrl_c_stops_the_answer_and_keeps_what_was_said(runs, monkeypatch):
    chat = Chat(options(runs[1]), notes := io.StringIO())
    ids = chat.tokenizer.encode("thee")

    def interrupted(self, prompt, max_new_tokens=None, stop_tokens=()):
        yield from ids[:2]
        raise KeyboardInterrupt

    monkeypatch.setattr(Decoder, "tokens", interrupted)
    out = io.StringIO()
    answer = chat.answer("Shall I", out)
    assert (answer.text, answer.ending, out.getvalue()) == ("th", "stopped", "th\n")
    assert notes.getvalue() == "[stopped]\n" and chat.turns == [("Shall I", "th")]
    # a script's --prompt ends as an interrupted command does
    assert main(["chat", f"--out_dir={runs[1]}", "--prompt=Shall I", "--device=cpu"]) == 130


def test_commands_in_the_loop(runs, reference):
    lines = iter(["Shall I", "/system " + SYSTEM, "", "Shall I", "/reset", "/bogus", "Shall I", "zzz",
                  "/quit", "never read"])
    notes, out = io.StringIO(), io.StringIO()
    chat = Chat(options(runs[1]), notes)
    repl(chat, read=lambda prompt: next(lines), out=out)
    with_system = reference([{"role": "system", "content": SYSTEM}, user("Shall I")])
    banner = out.getvalue().splitlines()[:4]
    assert banner[0].startswith(f"gptforge chat: {runs[1]}, iteration 40 (")
    assert banner[0].endswith("M parameters, 64-token context, cpu)")
    assert out.getvalue().splitlines()[4:] == [reference([user("Shall I")]), with_system, with_system]
    assert notes.getvalue().splitlines()[:3] == [
        f"[system prompt: {SYSTEM}]", "[conversation forgotten, system prompt kept]",
        "error: unknown command /bogus: they are /reset, /system TEXT and /quit"]
    assert "error: character 'z' (U+007A) at position 0 is not in this char tokenizer's" in notes.getvalue()
    assert next(lines) == "never read" and chat.turns == [("Shall I", with_system)]

    def end_of_input(prompt):
        raise EOFError

    repl(chat, read=end_of_input, out=io.StringIO())  # Ctrl-D returns


def read_until(fd: int, text: str, seen: list[str], timeout: float = 120.0) -> str:
    """What the terminal shows, escape sequences and carriage returns left out, up to and including the next
    `text`; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while text not in seen[0]:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} within {timeout} s; the terminal shows {seen[0]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            assert chunk, f"the chat ended before {text!r}; the terminal shows {seen[0]!r}"
            seen[0] += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r", "", chunk)
    before, _, seen[0] = seen[0].partition(text)
    return before + text


def ctrl_c_until(pid: int, fd: int, text: str, seen: list[str], timeout: float = 120.0) -> None:
    """Press Ctrl-C as a terminal sends it (SIGINT to the foreground group: not every pty driver acts on
    \\x03) until `text` shows, again after 5 s as a user would. CPython's readline misses a SIGINT that lands
    while it handles a keystroke rather than waiting in select(), and the echo that tells the test the keys
    arrived is written just before that window closes."""
    deadline = time.monotonic() + timeout
    while True:
        os.killpg(pid, signal.SIGINT)
        try:
            read_until(fd, text, seen, timeout=5.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_a_session_in_a_terminal(runs, reference):
    command = [sys.executable, "-m", "gptforge", "chat", f"--out_dir={runs[1]}", "--device=cpu",
               "--temperature=0", "--max_new_tokens=16"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, its terminal the pseudo-terminal
        try:
            # as a shell starts it: a runner without a terminal may have left Ctrl-C ignored or blocked, and
            # exec keeps both
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            os.execve(sys.executable, command, {**os.environ, "TERM": "dumb"})
        finally:
            os._exit(127)  # never run the rest of the tests in the child
    seen = [""]
    try:
        banner = read_until(fd, PROMPT, seen)
        assert f"gptforge chat: {runs[1]}" in banner and "/reset" in banner and "/system TEXT" in banner
        assert "/quit" in banner and "Ctrl-C stops an answer" in banner and "Ctrl-D" in banner

        def turn(line: str) -> str:
            os.write(fd, line.encode() + b"\r")
            return read_until(fd, "\n" + PROMPT, seen)

        first = reference([user("Shall I")])
        assert turn("Shall I") == f"Shall I\n{first}\n{PROMPT}"
        second = reference([user("Shall I"), assistant(first), user("So long")])
        assert turn("So long") == f"So long\n{second}\n{PROMPT}"
        assert turn("/system " + SYSTEM) == f"/system {SYSTEM}\n[system prompt: {SYSTEM}]\n{PROMPT}"
        with_system = reference([{"role": "system", "content": SYSTEM}, user("Shall I")])
        assert turn("Shall I") == f"Shall I\n{with_system}\n{PROMPT}"  # the earlier turns are forgotten
        assert turn("/reset") == f"/reset\n[conversation forgotten, system prompt kept]\n{PROMPT}"
        assert turn("Shall I") == f"Shall I\n{with_system}\n{PROMPT}"
        os.write(fd, b"So lo")  # Ctrl-C at the prompt drops the line, and the chat goes on
        read_until(fd, "So lo", seen)
        ctrl_c_until(pid, fd, "\n" + PROMPT, seen)
        os.write(fd, b"/quit\r")
        deadline = time.monotonic() + 120
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the chat did not quit"
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 4096)
        pid = 0
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.parametrize(("args", "message"), [
    (["--out_dir={base}", "--prompt=Shall I"],
     "{base} has no chat template: finetune it with `gptforge sft` first"),
    (["--out_dir={sft}", "--temperature=-1"], "--temperature=-1.0 must be >= 0 (0 is greedy)"),
    (["--out_dir={sft}", "--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    (["--out_dir={sft}", "--top_k=0"], "--top_k=0 must be at least 1, or None"),
    (["--out_dir={sft}", "--max_new_tokens=-1"], "--max_new_tokens=-1 must be >= 0"),
    (["--out_dir={sft}", "--seed=-3"], "--seed=-3 must be >= 0"),
    (["--out_dir={sft}", "--temprature=0.5"], "unknown option --temprature (did you mean --temperature?)"),
    (["--out_dir={sft}", "--system=zzz"], "--system: character 'z' (U+007A) at position 0 is not in this"),
    (["--out_dir={sft}", "--prompt=" + "S" * 70], "this message takes 73 tokens: no room for an answer"),
    (["--out_dir={sft}", "--device=cpu", "--max_new_tokens", "3"], "write --max_new_tokens=3"),
])
def test_bad_command_lines_are_one_line_errors(runs, capsys, args, message):
    names = {"base": runs[0], "sft": runs[1]}
    assert main(["chat", "--device=cpu", *(arg.format(**names) for arg in args)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message.format(**names) in err, err


def test_the_command_is_listed_with_its_options(capsys):
    assert main(["--help"]) == 0
    assert "  chat " in capsys.readouterr().out
    assert main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gptforge chat") and "--prompt=''" in out and "--top_p=None" in out
