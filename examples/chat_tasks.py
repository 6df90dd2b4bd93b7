"""Simple, checkable chat tasks for supervised finetuning, written as OpenAI `messages` JSON Lines.

    .venv/bin/python examples/chat_tasks.py --out=DIR --n_train=4000 --n_val=300 --seed=0 \\
        [--run=out-shakespeare-char]
    .venv/bin/python examples/chat_tasks.py --table=RUN[,RUN...] [--data=DIR/val.jsonl]

The first writes DIR/train.jsonl and DIR/val.jsonl, one conversation a line: a user turn asking for one of six
operations on English words and the assistant's exact answer: reverse it (`Reverse: house` -> `esuoh`),
upper-case it, spell it letter by letter, its first letter, its last letter, copy two words (train draws the
slow-to-learn reverse and copy twice as often as the others; val has as many of each). The word list is
split once, by the seed: val uses only words that no train line contains, so exact match on val measures
whether the operation was learned, not whether the answers were memorised. The text is letters, spaces and
colons, all among the 65 characters of tinyshakespeare (the CPU quick start's char vocabulary, which has no
digits but '3'), and short (at most 36 ids with the chat template, for a 64-token context). `--run` checks
every line with that run's tokenizer and context and exits with an error otherwise; `--run=` skips the check.

The second prints a table of finetuned runs: iterations and training time, exact match from `gptforge eval
--task=chat` (RUN/eval.json), and with `--data`, each task's exact match (greedy answers, up to `<|end|>`).
`make chat-demo` runs both (docs/chat.md, "A demo that shows it learns"). This script knows the tasks; models,
tokenizers and the chat template are gptforge's.
"""

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

# Common English words of 3 to 6 letters; the seed splits them into train and val words.
WORD_TEXT = """
    able acid aged also area army away baby back bake ball band bank barn base bath bean bear beat bell belt
    bench best bike bird bite black blade blame blank blow blue boat body bold bone book boot born boss both
    bowl brain brave bread brick bride brief bring broad brown brush build bulk burn bush busy cabin cake
    calm camp candy cape card care cart case cash cast cat cave chain chair chalk charm cheap check cheek
    chef chess chest chief child chin city clay clean clerk climb clock cloth cloud club coal coast coat
    code coin cold comb cook cool copper cord corn cost couch count cover crab crane crisp crop crowd crown
    cube cup curve cycle daily dance dark data dawn deal dear deep deer desk dial diet dirt dish dive dock
    doll door dough dozen draft drama dream dress drift drink drive drum duck dust duty eagle early earth
    east easy edge eight elbow empty enemy entry equal error event exact extra fable face fact fair faith
    fall fame farm fast fault feast fence ferry fever field fifth fifty film final fish five flag flame
    flash fleet flint float flock flood floor flour fluid flute foam focus fold folk food fork form fort
    forty fox frame fresh frog front frost fruit fuel funny gain game gate gauge gem ghost giant gift girl
    glad glass globe glove glue goat gold golf good grain grand grape grass grave gravy great green grid
    grip group guard guest guide habit hair half hall hand happy harbor hard harm hat hawk head heart heat
    heavy hedge hill hint hobby hold hole home honey hook hope horn horse host hotel house human humor hunt
    hurry ice idea image inch index ink iron item ivory jacket jaw jazz jelly jewel job joke judge juice
    jump jury keen kettle key kick kind king kite knee knife knot label lace ladder lake lamb lamp land
    large laser laugh lawn layer lazy leaf lean learn lemon lens level lid light limb lime line lion lip
    list load loan lock log long loop lord lucky lunch lung magic maid mail major maple march mark mask mass
    match meal meat medal melon menu mercy metal milk mill mind mint mirror model money month moon moral
    moss motor mouse mouth movie mud mule music nail name navy neck needle nerve nest net news night noble
    noise north nose note novel nurse nut oak ocean offer oil olive onion open opera orange orbit order
    organ otter oven owl owner paint palm panel paper park party paste path peach pearl pedal pen pencil
    pepper piano pilot pine pipe pitch place plain plane plant plate plum poem point polar pond pony pool
    porch port pot power press price pride print prize proof pulse pump pupil purse quick quiet quilt quote
    rabbit race radio rail rain ranch range rapid raven razor reach ready realm rebel reef relay rice ridge
    rifle ring river road robin robot rock roof room root rope rose round route royal rubber ruby rug rule
    rural saddle safe sail salad salt sand sauce scale scarf scene scout screw sea seed shade shadow shape
    share shark sheep shelf shell shield shine ship shirt shoe shore short silk silver sink sister skate
    skill skirt sky sleep slice slope smile smoke snake snow soap sock soft solar solid song soup south
    space spark spell spice spider spine spoon sport spot spray spring square staff stage stair stamp star
    steam steel stem stick stone stool storm story stove straw stream street sugar suit summer sun swamp
    sweet swing sword table tail talent tank tape taste tea teeth tent theme thick thorn thread tiger timber
    toast token tooth torch tower town toy track trail train treat tree trend tribe truck trunk tulip tunnel
    turtle twin uncle union unit urban valley value van vapor velvet verse video violin visit voice wagon
    waist walk wall water wave wax wheat wheel whip wind window wing winter wire wish wolf wood wool world
    worm yard year yeast yellow young zebra zero zone
"""
WORDS = WORD_TEXT.split()

TASKS = {  # name -> (the prompt's head, the words it takes, the answer)
    "reverse": ("Reverse", 1, lambda w: w[0][::-1]),
    "upper": ("Upper", 1, lambda w: w[0].upper()),
    "spell": ("Spell", 1, lambda w: " ".join(w[0])),
    "first": ("First letter", 1, lambda w: w[0][0]),
    "last": ("Last letter", 1, lambda w: w[0][-1]),
    "copy": ("Copy", 2, " ".join),
}
# Train draws the two tasks a small model learns slowest twice as often; val has as many of each task.
TRAIN_WEIGHTS = {"reverse": 2, "copy": 2}


def split_words(seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train words, val words): the word list shuffled by `seed`, its last `val_fraction` held out."""
    if len(set(WORDS)) != len(WORDS):
        raise SystemExit("chat_tasks.py: the word list has duplicates")
    words = sorted(WORDS)
    random.Random(seed).shuffle(words)
    n_val = max(1, round(len(words) * val_fraction))
    return words[:-n_val], words[-n_val:]


def conversation(task: str, words: list[str]) -> dict:
    head, _, answer = TASKS[task]
    return {"messages": [{"role": "user", "content": f"{head}: {' '.join(words)}"},
                         {"role": "assistant", "content": answer(words)}]}


def conversations(words: list[str], n: int, rng: random.Random, weights: dict[str, int] | None = None,
                  unique: bool = False) -> list[dict]:
    """`n` conversations on `words`: tasks drawn with the odds `weights` gives (1 where it names none), or
    without `weights` each task in turn, so each has its share of `n`; `unique`: no conversation twice."""
    names = sorted(TASKS)
    chances = [(weights or {}).get(name, 1) for name in names]
    out, seen = [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        task = rng.choices(names, chances)[0] if weights else names[len(out) % len(names)]
        record = conversation(task, rng.sample(words, TASKS[task][1]))
        key = json.dumps(record)
        if unique and key in seen:
            continue
        seen.add(key)
        out.append(record)
    else:
        raise SystemExit(f"chat_tasks.py: cannot draw {n} distinct conversations from {len(words)} words")
    return out


def generate(n_train: int, n_val: int, seed: int, val_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """The train and val conversations of `seed`: a pure function of its arguments."""
    train_words, val_words = split_words(seed, val_fraction)
    rng = random.Random(seed)
    train = conversations(train_words, n_train, rng, TRAIN_WEIGHTS)
    return train, conversations(val_words, n_val, rng, unique=True)


def task_of(messages: list[dict]) -> str:
    """Which task a conversation asks for, from its prompt's head."""
    head = messages[-2]["content"].split(": ", 1)[0]
    return next((name for name, (h, _, _) in TASKS.items() if h == head), "other")


def check_with_run(records: list[dict], run: str) -> None:
    """Every conversation encodes with `run`'s tokenizer and fits its context; else exit saying which not."""
    from gptforge.chat_template import ChatTemplate
    from gptforge.errors import GptforgeError
    from gptforge.runs import load_run

    try:
        loaded = load_run(run)
        template = loaded.chat_template or ChatTemplate.for_tokenizer(loaded.tokenizer)
        longest = 0
        for number, record in enumerate(records, 1):
            try:
                ids, _ = template.render(loaded.tokenizer, record["messages"])
            except GptforgeError as e:
                raise GptforgeError(f"conversation {number} ({json.dumps(record)}): {e}") from None
            longest = max(longest, len(ids))
    except GptforgeError as e:
        raise SystemExit(f"chat_tasks.py: --run={run}: {e}") from None
    block_size = loaded.model.config.block_size
    if longest > block_size + 1:
        raise SystemExit(f"chat_tasks.py: a conversation of {longest} ids does not fit {run}'s context of "
                         f"{block_size}: finetuning would drop it")
    print(f"checked with {run}'s tokenizer: every character encodes; the longest conversation is {longest} "
          f"ids (context {block_size})")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def by_task(run: str, data: str, batch_size: int = 64) -> dict[str, float]:
    """A run's greedy exact match on the conversations of `data`, per task. An answer is its tokens before
    `<|end|>`; one that never says `<|end|>` within the longest reference and 4 tokens more is wrong."""
    import torch

    from gptforge.generate import stream
    from gptforge.source import load_source

    source = load_source(run, which="latest")
    model, tokenizer, template = source.model.eval(), source.tokenizer, source.chat_template
    if template is None:
        raise SystemExit(f"chat_tasks.py: {run} has no chat template: finetune it with `gptforge sft`")
    records = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    prompts = [template.render(tokenizer, r["messages"][:-1], add_generation_prompt=True)[0] for r in records]
    budget = max(len(tokenizer.encode(r["messages"][-1]["content"])) for r in records) + 4
    answers: list[str | None] = [None] * len(records)
    by_length = defaultdict(list)  # prompts of one length decode together: no padding needed
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    with torch.no_grad():
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
                steps = stream(model, idx, max_new_tokens=min(budget, model.config.block_size - length),
                               temperature=0, stop_tokens=[template.end])
                for i, row in zip(chunk, torch.stack(list(steps), dim=1).tolist(), strict=True):
                    if template.end in row:
                        answers[i] = tokenizer.decode(row[:row.index(template.end)])
    right, total = defaultdict(int), defaultdict(int)
    for record, answer in zip(records, answers, strict=True):
        task = task_of(record["messages"])
        total[task] += 1
        right[task] += answer == record["messages"][-1]["content"]
    return {t: right[t] / total[t] for t in sorted(total)}


def table(runs: list[str], data: str | None) -> list[dict]:
    """One row per run: its iterations and training time (its checkpoint), its exact match from `gptforge eval
    --task=chat` (RUN/eval.json), and with `data`, the exact match of each task."""
    from gptforge.checkpoint import load_checkpoint

    rows = []
    for run in runs:
        ckpt = load_checkpoint(run, which="latest")
        results = Path(run) / "eval.json"
        chat = json.loads(results.read_text()).get("chat", {}) if results.is_file() else {}
        rows.append({"run": run, "iters": ckpt.get("iter_num"),
                     "train_s": (ckpt.get("progress") or {}).get("elapsed_s"),
                     "lora": (ckpt.get("lora") or {}).get("rank"), "exact": chat.get("exact"),
                     "n": chat.get("n"), **({"per_task": by_task(run, data)} if data else {})})
    tasks = sorted({t for r in rows for t in r.get("per_task", {})})
    head = ["run", "iters", "train s", "exact match", *tasks]
    cells = [[r["run"] + (f" (LoRA r={r['lora']})" if r["lora"] else ""), str(r["iters"]),
              "-" if r["train_s"] is None else f"{r['train_s']:.0f}",
              "-" if r["exact"] is None else f"{100 * r['exact']:.1f}% of {r['n']}",
              *(f"{100 * r['per_task'][t]:.0f}%" for t in tasks)] for r in rows]
    widths = [max(len(row[c]) for row in [head, *cells]) for c in range(len(head))]
    for row in [head, ["-" * w for w in widths], *cells]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write DIR/train.jsonl and DIR/val.jsonl")
    parser.add_argument("--n_train", type=int, default=4000)
    parser.add_argument("--n_val", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=0.2, help="the share of the words val uses")
    parser.add_argument("--run", default="out-shakespeare-char",
                        help="check every line with this run's tokenizer and context ('': do not check)")
    parser.add_argument("--table", help="instead, tabulate these runs (comma-separated)")
    parser.add_argument("--data", help="with --table: also score each task on these conversations")
    args = parser.parse_args(argv)
    if args.table:
        table([run for run in args.table.split(",") if run], args.data)
        return
    if not args.out:
        parser.error("--out=DIR is required (or --table=RUN,...)")
    train, val = generate(args.n_train, args.n_val, args.seed, args.val_fraction)
    if args.run:
        check_with_run(train + val, args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    train_words, val_words = split_words(args.seed, args.val_fraction)
    print(f"{out}/train.jsonl: {len(train)} conversations on {len(train_words)} words; {out}/val.jsonl: "
          f"{len(val)} on {len(val_words)} other words; tasks: {', '.join(TASKS)}")


if __name__ == "__main__":
    main(sys.argv[1:])
