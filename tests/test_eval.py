"""Tests for gptforge.evaluate and gptforge.data.eval_sets: every task against an independent reference (a
tiny random HF GPT2LMHeadModel with GPT-2's vocabulary, scored one example at a time with plain HF forward
passes) on the first examples of the real files in the mirror; batch-size independence; both HellaSwag
formats; errors. The chat task: a tiny finetuned char run's batched answers against `generate.stream`'s, one
conversation at a time.

    .venv/bin/python -m pytest tests/test_eval.py
"""

import bz2
import io
import json
import math
import re
import zipfile

import numpy as np
import pytest
import torch
from mirror_data import MIRROR, needs_mirror
from tiny_run import tiny_run

from gptforge.chat_template import ChatTemplate
from gptforge.checkpoint import load_checkpoint, save_checkpoint
from gptforge.cli import main
from gptforge.data import eval_sets
from gptforge.errors import GptforgeError
from gptforge.evaluate import EvalOptions, Request, Scorer, evaluate, fit_context, normalize, windows
from gptforge.generate import stream
from gptforge.model import GPT
from gptforge.options import apply_overrides
from gptforge.source import load_source
from gptforge.tokenizer import GPT2Tokenizer

transformers = pytest.importorskip("transformers")

BLOCK = 256  # the tiny model's context: longer than every LAMBADA passage (224) and HellaSwag row (151)
N = 40  # examples of each file compared with the reference


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary,
    its weights large enough for confident, distinct predictions."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.2)
    directory = tmp_path_factory.mktemp("eval") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("char-run"))


@pytest.fixture(scope="module")
def encoding():
    return GPT2Tokenizer(MIRROR)


def reference_scores(hf_model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The summed log-probability of `continuation` after `context`, and whether each token is the argmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits[0].double(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, continuation, strict=True))
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation, strict=True))
    return total, greedy


def run_eval(tmp_path, **options):
    opts = apply_overrides(EvalOptions(), {"device": "cpu", "dtype": "float32", "progress": False,
                                           "to": str(tmp_path / "eval.json"), **options})
    return evaluate(opts, out=io.StringIO())


@needs_mirror
def test_lambada_matches_the_reference(hf_dir, hf_model, encoding, tmp_path):
    passages = eval_sets.lambada(MIRROR, tmp_path)[:N]
    totals, hits = [], []
    for text in passages:
        context, word = text.rsplit(" ", 1)
        total, greedy = reference_scores(hf_model, encoding.encode(context), encoding.encode(" " + word))
        totals.append(total)
        hits.append(greedy)
    result = run_eval(tmp_path, init_from=str(hf_dir), task="lambada", limit=N, batch_size=7)["lambada"]
    assert result["n"] == N
    assert result["acc"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert result["ppl"] == pytest.approx(math.exp(-np.mean(totals)), rel=1e-5)


@needs_mirror
def test_hellaswag_picks_the_reference_labels(hf_dir, hf_model, encoding, tmp_path):
    tasks = eval_sets.hellaswag(MIRROR, tmp_path)[:N]
    reference, reference_norm, sums = [], [], []
    for task in tasks:
        context = encoding.encode(task.context)
        scores = [(reference_scores(hf_model, context, encoding.encode(" " + e))[0],
                   len(encoding.encode(" " + e)))
                  for e in task.endings]
        sums.append([s for s, _ in scores])
        reference.append(int(np.argmax([s for s, _ in scores])))
        reference_norm.append(int(np.argmax([s / n for s, n in scores])))
    # the predictions are not degenerate: the model prefers different endings for different tasks
    assert len(set(reference)) > 1 and len(set(reference_norm)) > 1
    labels = [t.label for t in tasks]
    result = run_eval(tmp_path, init_from=str(hf_dir), task="hellaswag", limit=N)["hellaswag"]
    assert result["n"] == N
    assert result["acc"] == np.mean(np.array(reference) == labels)
    assert result["acc_norm"] == np.mean(np.array(reference_norm) == labels)

    # the same per-ending sums, and so the same predicted label of every task, whatever the batch size
    scorer_groups = []
    for task in tasks:
        context = encoding.encode(task.context)
        scorer_groups.append(
            [Request(context + encoding.encode(" " + e), len(context)) for e in task.endings]
        )
    model = GPT.from_pretrained(hf_dir)
    for batch_size in (1, 5, 64):
        scored = Scorer(model, batch_size=batch_size, progress=False).score(scorer_groups)
        ours = [[s.logprobs.sum() for s in group] for group in scored]
        np.testing.assert_allclose(ours, sums, rtol=1e-5)
        assert [int(np.argmax(o)) for o in ours] == reference


@needs_mirror
def test_wikitext2_matches_sliding_window_reference(hf_dir, hf_model, encoding, tmp_path):
    text = eval_sets.wikitext2(MIRROR, tmp_path)
    ids = encoding.encode(text)
    limit, stride = 6, 100
    # The reference: HF's sliding-window recipe, scoring in each window only the tokens the last one did not.
    nats, scored_to, begin, n_windows = 0.0, 1, 0, 0
    while n_windows < limit:
        end = min(begin + BLOCK + 1, len(ids))
        window = torch.tensor([ids[begin:end - 1]])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(window).logits[0].double(), dim=-1)
        for t in range(scored_to, end):
            nats -= float(logprobs[t - begin - 1, ids[t]])
        scored_to, begin, n_windows = end, begin + stride, n_windows + 1
    count = scored_to - 1
    n_bytes = len(encoding.decode(ids[1:scored_to]).encode("utf-8"))
    result = run_eval(tmp_path, init_from=str(hf_dir), task="wikitext2", limit=limit, stride=stride,
                      batch_size=4)["wikitext2"]
    assert result["tokens"] == count == BLOCK + (limit - 1) * stride
    assert result["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_val_scores_every_token_of_the_split_once(tmp_path):
    run = tiny_run(tmp_path)
    model = GPT.from_checkpoint(run / "best.pt", override_args={"dropout": 0.0}).eval()
    val = np.fromfile(tmp_path / "data" / "sonnet" / "val.bin", dtype=np.uint16).astype(np.int64)
    block = model.config.block_size
    nats = 0.0
    with torch.no_grad():  # non-overlapping windows, each scored with the model's own loss
        for begin in range(0, len(val) - 1, block):
            chunk = torch.from_numpy(val[begin:begin + block + 1])
            _, loss = model(chunk[None, :-1], chunk[None, 1:])
            nats += float(loss) * (len(chunk) - 1)
    result = run_eval(tmp_path, out_dir=str(run), task="val", batch_size=3)["val"]
    assert result["tokens"] == len(val) - 1
    assert result["loss"] == pytest.approx(nats / (len(val) - 1), rel=1e-5)
    # one byte per character of the sonnet: bits per byte is the loss in bits
    assert result["bpb"] == pytest.approx(nats / (len(val) - 1) / math.log(2), rel=1e-5)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["val"]["loss"] == result["loss"] and saved["val"]["iter_num"] == 20


def test_windows_score_every_token_once_with_the_most_context():
    for n, block, stride in [(10, 4, 4), (10, 4, 2), (1000, 64, 32), (65, 64, 64), (3, 64, 32), (100, 8, 1)]:
        seen = []
        for begin, end, score_from in windows(n, block, stride):
            assert end - begin <= block + 1 and score_from >= 1
            seen.extend(range(begin + score_from, end))
            # each scored token sees at least block - stride tokens of context, or all there are
            assert begin + score_from - begin >= min(begin + score_from, block - stride + 1) or begin == 0
        assert seen == list(range(1, n))
    with pytest.raises(GptforgeError, match="larger than block_size"):
        windows(100, 8, 9)


def test_long_sequences_lose_their_oldest_context():
    assert fit_context(Request(list(range(10)), 7), block_size=5) == Request(list(range(4, 10)), 3)
    assert fit_context(Request(list(range(5)), 2), block_size=5) == Request(list(range(5)), 2)
    with pytest.raises(GptforgeError, match="does not fit"):
        fit_context(Request(list(range(10)), 2), block_size=5)


def test_bf16_scores_are_close_to_fp32(tiny_model):
    groups = [[Request(list(range(i, i + 20)), 5), Request(list(range(i, i + 12)), 3)] for i in range(6)]
    fp32 = Scorer(tiny_model, progress=False).score(groups)
    bf16 = Scorer(tiny_model, dtype="bfloat16", progress=False).score(groups)
    for a, b in zip(fp32, bf16, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=0.05, atol=0.05)


def hellaswag_rows():
    return [
        {"ctx": "A man is sitting on a roof. he", "endings": ["is up.", "falls.", "sits.", "waves."],
         "label": 3},
        {"ctx": "Two dogs run. they", "endings": ["stop.", "bark at a cat.", "play.", "sleep."], "label": 0},
    ]


def test_both_hellaswag_formats_read_the_same_tasks(tmp_path):
    jsonl = tmp_path / "hellaswag_val.jsonl"
    jsonl.write_text("".join(json.dumps({"ind": i, **row}) + "\n" for i, row in enumerate(hellaswag_rows())))
    text = "".join(f"{r['ctx']}\n{r['label']}\n" + "".join(e + "\n" for e in r["endings"])
                   for r in hellaswag_rows())
    compact = tmp_path / "hellaswag_val_full.txt.bz2"
    compact.write_bytes(bz2.compress(text.encode()))
    expected = [eval_sets.Choice(r["ctx"], tuple(r["endings"]), r["label"]) for r in hellaswag_rows()]
    assert eval_sets.read_hellaswag_jsonl(jsonl) == expected
    assert eval_sets.read_hellaswag_text(compact) == expected
    broken = tmp_path / "broken.txt"
    broken.write_text(text + "one more line\n")
    with pytest.raises(GptforgeError, match="not 6 per task"):
        eval_sets.read_hellaswag_text(broken)


@needs_mirror
def test_the_mirrors_hellaswag_file_has_every_task():
    tasks = eval_sets.hellaswag(MIRROR, MIRROR)
    assert len(tasks) == eval_sets.HELLASWAG_TASKS
    assert tasks[0].context == "Roof shingle removal: A man is sitting on a roof. he" and tasks[0].label == 3


@needs_mirror
def test_wikitext2_is_taken_out_of_the_official_archive_when_no_mirror_has_it(tmp_path, monkeypatch):
    raw = (MIRROR / eval_sets.WIKITEXT2_TEST.mirror_path).read_bytes()

    def fake_fetch(content: bytes):
        def fetch(remote, mirror, dest):
            assert remote == eval_sets.WIKITEXT2_ZIP and mirror is None
            with zipfile.ZipFile(dest, "w") as z:
                z.writestr(eval_sets.WIKITEXT2_MEMBER, content)
            return dest
        return fetch

    monkeypatch.setattr(eval_sets, "fetch", fake_fetch(raw[:-1] + b"!"))
    with pytest.raises(GptforgeError, match="not the official file"):
        eval_sets.wikitext2(None, tmp_path)
    assert not (tmp_path / "wiki.test.raw").exists()
    monkeypatch.setattr(eval_sets, "fetch", fake_fetch(raw))
    assert eval_sets.wikitext2(None, tmp_path) == raw.decode("utf-8")
    assert (tmp_path / "wiki.test.raw").read_bytes() == raw


@needs_mirror
@pytest.mark.parametrize(("args", "message"), [
    (["--task=squad"], "--task=squad: choose from val, wikitext2, lambada, hellaswag"),
    (["--task=lambada", "--limit=0"], "--limit=0 must be at least 1"),
    (["--task=lambada", "--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--task=lambada", "--dtype=int8"], "--dtype='int8' is not one of"),
    (["--task=lambada", "--limit=3"], "char tokenizer cannot encode the task's text"),
    (["--task=val", "--dataset=nowhere"], "nowhere"),
    (["--task=wikitext2", "--stride=999"], "--stride=999 is larger than block_size=32"),
])
def test_bad_options_are_one_line_errors(char_run, capsys, args, message):
    assert main(["eval", f"--out_dir={char_run}", "--device=cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gptforge eval: error: ") and captured.err.count("\n") == 1
    assert re.search(re.escape(message), captured.err)


def test_val_of_a_pretrained_model_needs_a_dataset(hf_dir, capsys):
    assert main(["eval", f"--init_from={hf_dir}", "--task=val", "--device=cpu"]) == 2
    assert "--task=val needs a prepared dataset: name it with --dataset=NAME" in capsys.readouterr().err


@needs_mirror
def test_the_command_prints_a_table_and_json_lines_and_merges_results(hf_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"hellaswag": {"acc": 0.5}}))
    assert main(["eval", f"--init_from={hf_dir}", "--task=lambada,wikitext2", "--limit=3", "--device=cpu",
                 f"--to={out}", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["task", "n"] and lines[1].startswith("lambada")
    tail = [json.loads(line) for line in lines[-2:]]
    assert [t["task"] for t in tail] == ["lambada", "wikitext2"] and tail[0]["n"] == 3
    saved = json.loads(out.read_text())
    assert set(saved) == {"hellaswag", "lambada", "wikitext2"}  # earlier results are kept
    assert saved["lambada"]["acc"] == tail[0]["acc"] and saved["lambada"]["model"] == str(hf_dir)


@needs_mirror
def test_a_results_file_that_is_not_json_is_left_alone(hf_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text("not json")
    assert main(["eval", f"--init_from={hf_dir}", "--task=wikitext2", "--limit=1", "--device=cpu",
                 f"--to={out}"]) == 2
    assert "is not a JSON results file" in capsys.readouterr().err
    assert out.read_text() == "not json"


# ------------------------------------------------------------------------------------------------------------
# --task=chat: a tiny char run finetuned for ten steps; its sonnet vocabulary spells every prompt below.

CHAT_WORDS = ["thee", "day", "May", "summer", "fair", "eyes", "time", "death", "shade", "gold", "lines",
              "life"]


def spell(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Spell {word}."}, {"role": "assistant", "content": " ".join(word)}]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A finetuned run: `gptforge sft` of the tiny char run, its weights then jittered. Ten steps teach the
    tiny model to answer spaces alone; the jitter (and a larger end-of-turn row of the head) makes greedy
    answers varied, some ending at <|end|> early, some running to the context, some holding marker text."""
    root = tmp_path_factory.mktemp("chat-run")
    base = tiny_run(root)
    data = root / "train.jsonl"
    write_jsonl(data, [record for word in CHAT_WORDS for record in (
        {"messages": spell(word)},
        {"instruction": "Reverse the word.", "input": word, "output": word[::-1]},
    )])
    run = root / "sft"
    assert main(["sft", f"--init_from={base}", f"--data={data}", f"--out_dir={run}", "--max_iters=10",
                 "--device=cpu", "--eval_interval=5", "--eval_iters=2", "--batch_size=4"]) == 0
    ckpt = load_checkpoint(run, which="best")
    end = ChatTemplate.from_spec(ckpt["chat_template"]).end
    generator = torch.Generator().manual_seed(0)
    ckpt["model"] = {name: weight + 0.1 * torch.randn(weight.shape, generator=generator)
                     for name, weight in ckpt["model"].items()}
    ckpt["model"]["lm_head.weight"][end] *= 3
    save_checkpoint(run, ckpt, best=True)
    return run


@pytest.fixture(scope="module")
def chat_source(chat_run):
    source = load_source(str(chat_run))
    source.model.eval()
    return source


# What comes before each held-out conversation's last assistant turn: system prompts, earlier turns, and
# turns after it (ignored), in OpenAI's shape; the Alpaca lines are added by `held_out`.
CHAT_PROMPTS = [
    [{"role": "user", "content": "Spell thee."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Spell day."}],
    [*spell("May"), {"role": "user", "content": "Again."}],
    [{"role": "user", "content": "Spell fair."}],
    [{"role": "user", "content": "Spell gold, then lines."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Spell life?"}],
]
ALPACA_WORDS = ["summer", "eyes", "time"]
TOO_LONG = [{"role": "user", "content": "Spell every word of the sonnet, one at a time."}]


def reference_answer(source, messages, max_new_tokens: int = 64) -> str:
    """The greedy answer to `messages` decoded alone by `generate.stream`: up to the end-of-turn marker, at
    most `max_new_tokens`, and no further than the context."""
    template = source.chat_template
    prompt, _ = template.render(source.tokenizer, messages, add_generation_prompt=True)
    budget = min(max_new_tokens, source.model.config.block_size + 1 - len(prompt))
    ids = []
    for token in stream(source.model, torch.tensor([prompt]), budget, temperature=0.0,
                        stop_tokens=[template.end]):
        if int(token) == template.end:
            break
        ids.append(int(token))
    return source.tokenizer.decode(ids)


def held_out(source, path, max_new_tokens: int = 64) -> list[tuple[str, str]]:
    """Write a held-out file whose references are, in turn, the model's own answer (exact), the answer
    uppercased amid spaces and a full stop (normalized only), and the answer plus a word (neither); and a
    conversation whose prompt does not fit, last. Returns (answer, reference) per scored conversation."""
    alpaca = [[{"role": "user", "content": f"Reverse the word.\n\n{w}"}] for w in ALPACA_WORDS]
    prompts = [*CHAT_PROMPTS, *alpaca]
    records, pairs = [], []
    for i, messages in enumerate(prompts):
        answer = reference_answer(source, messages, max_new_tokens)
        reference = [answer, f"  {answer.upper()} . ", f"{answer} no"][i % 3]
        pairs.append((answer, reference))
        if i >= len(CHAT_PROMPTS):
            records.append({"instruction": "Reverse the word.", "input": ALPACA_WORDS[i - len(CHAT_PROMPTS)],
                            "output": reference})
        elif i == 2:  # a turn after the last assistant one is not part of the prompt
            records.append({"messages": [*messages, {"role": "assistant", "content": reference},
                                         {"role": "user", "content": "Thanks."}]})
        else:
            records.append({"messages": [*messages, {"role": "assistant", "content": reference}]})
    records.append({"messages": [*TOO_LONG, {"role": "assistant", "content": "no"}]})
    write_jsonl(path, records)
    return pairs


def expected_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """exact and normalized by the definition in docs/evaluation.md, computed here on its own."""
    def norm(text: str) -> str:
        words = text.lower().split()
        return re.sub(r"^[\s!-/:-@\[-`{-~]+|[\s!-/:-@\[-`{-~]+$", "", " ".join(words))

    return {"exact": float(np.mean([a == r for a, r in pairs])),
            "normalized": float(np.mean([norm(a) == norm(r) for a, r in pairs]))}


def test_normalize_lowercases_collapses_whitespace_and_strips_surrounding_punctuation():
    assert normalize("  The\tCAT\n sat. ") == "the cat sat"
    assert normalize('"t a c"!') == "t a c"
    assert normalize("... it's - ok ?!") == "it's - ok"  # inner punctuation stays
    assert normalize(" .,! ") == normalize("") == ""
    assert normalize("«tac»") == "«tac»"  # only ASCII punctuation is stripped


def test_batched_chat_answers_are_the_answers_decoded_alone(chat_source):
    template = chat_source.chat_template
    prompts = [template.render(chat_source.tokenizer, m, add_generation_prompt=True)[0] for m in CHAT_PROMPTS]
    for max_new_tokens in (64, 5):
        alone = [reference_answer(chat_source, m, max_new_tokens) for m in CHAT_PROMPTS]
        for batch_size in (2, 64):
            scorer = Scorer(chat_source.model, batch_size=batch_size, progress=False)
            answers = scorer.answer(prompts, template.end, max_new_tokens)
            assert [chat_source.tokenizer.decode(a) for a in answers] == alone
            assert all(template.end not in a for a in answers)
            block = chat_source.model.config.block_size
            budgets = [min(max_new_tokens, block + 1 - len(p)) for p in prompts]
            assert all(len(a) <= b for a, b in zip(answers, budgets, strict=True))
        # both ways an answer ends are here: at <|end|>, and at its budget
        lengths = [len(a) for a in answers]
        assert any(n < b for n, b in zip(lengths, budgets, strict=True)) and any(
            n == b for n, b in zip(lengths, budgets, strict=True))
        assert len(set(alone)) > 3


def test_chat_scores_the_greedy_answers_at_any_batch_size(chat_run, chat_source, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    pairs = held_out(chat_source, data)
    expected = expected_metrics(pairs)
    assert 0 < expected["exact"] < expected["normalized"] < 1  # the file tells the two apart
    for batch_size in (3, 8):
        result = run_eval(tmp_path, out_dir=str(chat_run), task="chat", data=str(data),
                          batch_size=batch_size)["chat"]
        assert result == {"task": "chat", "n": len(pairs), **expected, "dropped": 1, "max_new_tokens": 64}
    assert "1 conversation(s) whose prompt is longer than block_size=32 left out" in capsys.readouterr().err

    # --limit: the first conversations of the file; --max_new_tokens: answers as long as that at most
    limited = run_eval(tmp_path, out_dir=str(chat_run), task="chat", data=str(data), limit=4)["chat"]
    assert limited == {"task": "chat", "n": 4, **expected_metrics(pairs[:4]), "dropped": 0,
                       "max_new_tokens": 64}
    short = held_out(chat_source, tmp_path / "short.jsonl", max_new_tokens=3)
    result = run_eval(tmp_path, out_dir=str(chat_run), task="chat", data=str(tmp_path / "short.jsonl"),
                      max_new_tokens=3)["chat"]
    assert result["max_new_tokens"] == 3 and result["exact"] == expected_metrics(short)["exact"]


def test_the_chat_task_prints_its_columns_and_merges_into_eval_json(chat_run, chat_source, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    expected = expected_metrics(held_out(chat_source, data))
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"hellaswag": {"acc": 0.5}}))
    assert main(["eval", f"--out_dir={chat_run}", "--task=chat", f"--data={data}", "--device=cpu",
                 f"--to={out}", "--json", "--batch_size=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["task", "n", "exact", "normalized"]
    assert lines[1].split() == ["chat", "9", f"{expected['exact']:.4f}", f"{expected['normalized']:.4f}"]
    tail = json.loads(lines[-1])
    assert tail["task"] == "chat" and tail["exact"] == expected["exact"]
    saved = json.loads(out.read_text())
    assert set(saved) == {"hellaswag", "chat"}
    assert saved["chat"]["normalized"] == expected["normalized"] and saved["chat"]["model"] == str(chat_run)
    assert saved["chat"]["iter_num"] == 10


def test_the_chat_options_have_help(capsys):
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--data=" in text and "--max_new_tokens=64" in text and "chat" in text


@pytest.mark.parametrize(("lines", "message"), [
    (['{"messages": [{"role": "user", "content": "Spell day."}]}'],
     ":1: the conversation has no assistant turn"),
    ([json.dumps({"messages": spell("day")}), "{not json"], ":2: not a JSON line"),
    ([json.dumps({"messages": [{"role": "robot", "content": "hi"}, spell("day")[1]]})], ":1: unknown role"),
    ([json.dumps({"messages": [spell("day")[0], {"role": "assistant", "content": 3}]})],
     ":1: a message must be an object with a string 'content'"),
    ([json.dumps({"messages": spell("day")}), json.dumps({"messages": spell("zebra")})],
     ":2: "),  # 'z' is not in the sonnet's characters
    ([json.dumps({"messages": [*TOO_LONG, {"role": "assistant", "content": "no"}]})],
     "has no conversation whose prompt fits block_size=32 (1 longer ones left out)"),
])
def test_bad_conversations_are_file_line_errors(chat_run, tmp_path, capsys, lines, message):
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["eval", f"--out_dir={chat_run}", "--task=chat", f"--data={data}", "--device=cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gptforge eval: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    if message.startswith(":"):
        assert f"{data}{message}" in captured.err
    assert not (chat_run / "eval.json").exists()  # the error came before any work


@pytest.mark.parametrize(("args", "message"), [
    (["--task=chat"], "--task=chat needs --data=CONVERSATIONS.jsonl"),
    (["--task=val", "--data=held_out.jsonl"], "--data=held_out.jsonl is read by --task=chat only"),
    (["--task=chat", "--data=held_out.jsonl", "--max_new_tokens=0"], "--max_new_tokens=0 must be at least 1"),
    (["--task=chat", "--data=nowhere.jsonl"], "--data=nowhere.jsonl: no such file"),
])
def test_bad_chat_options_are_one_line_errors(chat_run, capsys, args, message):
    assert main(["eval", f"--out_dir={chat_run}", "--device=cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gptforge eval: error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_a_base_model_has_no_chat_to_score(char_run, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    write_jsonl(data, [{"messages": spell("day")}])
    assert main(["eval", f"--out_dir={char_run}", "--task=lambada,chat", f"--data={data}",
                 "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--task=chat needs a finetuned assistant: {char_run} has no chat template" in err
