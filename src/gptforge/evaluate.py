"""`gptforge eval`: score a run or a pretrained model on its val split, WikiText-2, LAMBADA and HellaSwag,
and a finetuned assistant on held-out conversations.

Every task but `chat` reduces to one primitive: sequences of tokens of which a suffix is scored, each scored
token given all the tokens before it (`score`). Sequences are sorted by length and forwarded in padded batches
(right padding: causal attention never lets a padded position change a real one); the head runs only at the
scored positions, and log-probabilities are summed in float64. So results do not depend on the batch size
beyond float rounding.

- `val`: the run's whole val split in non-overlapping windows of block_size (+1 target): every token but the
  first scored once. `loss` (mean NLL per token, nats), `ppl`, and `bpb`: bits per UTF-8 byte of the text the
  scored tokens decode to, end-of-text tokens left out of both sums, so char and BPE models compare.
- `wikitext2`: wiki.test.raw tokenized once, windows of block_size every `stride` tokens (default
  block_size/2), each token scored once with the most context its window gives: `loss`, token `ppl`, `bpb`.
- `lambada`: context `text.rsplit(" ", 1)[0]`, target `" " + last word`; `acc`: every target token is the
  greedy argmax; `ppl`: exp(-mean over passages of the target's summed log-likelihood) (lm-eval-harness's
  convention).
- `hellaswag`: each ending's `" " + ending` tokens scored after the context; `acc` picks the highest sum,
  `acc_norm` the highest sum per ending token (llm.c's way).
- `chat`: each conversation of `--data` up to its last assistant turn, rendered with the run's chat
  template, is answered greedily (until the template's end marker, `--max_new_tokens` or the context);
  `exact` and `normalized` are the shares of answers equal to that turn's content, as they are and after
  `normalize`. Prompts decode together, continuous-batching style: each prefilled alone into a slot of a
  `SlotKVCache`, then every unfinished one advanced a token per batched forward, a finished one's slot taken
  by the next prompt. Attention runs slot by slot, so answers depend on the batch size only by float rounding.
"""

import itertools
import json
import math
import string
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptforge.atomic import atomic_write_text, check_writable
from gptforge.chat_template import check_message
from gptforge.data import TokenDataset, eval_sets
from gptforge.data.conversations import read_records, to_messages
from gptforge.data.files import locate
from gptforge.device import torch_dtype
from gptforge.errors import GptforgeError
from gptforge.kv_cache import SlotKVCache
from gptforge.mirror import mirror_dir
from gptforge.model import GPT
from gptforge.quantize import quantize
from gptforge.source import Source, SourceOptions
from gptforge.tokenizer import Tokenizer, check_token_ids, encode_prompt

TASKS = ("val", "wikitext2", "lambada", "hellaswag", "chat")
RESULTS_FILE = "eval.json"
HEAD_CHUNK = 1 << 26  # logits computed at once (elements): 256 MiB in float32, whatever the vocabulary


@dataclass
class EvalOptions(SourceOptions):
    task: str = field(
        default="val", metadata={"help": f"{', '.join(TASKS)}, or several: --task=lambada,hellaswag"}
    )
    data_dir: str | None = field(  # SourceOptions' field, with what it also means here
        default=None,
        metadata={
            "help": "where datasets live (default: the run's, else data); downloads go to DATA_DIR/evals"
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "the prepared dataset whose val split `val` scores (default: the run's)"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "only the first N examples (windows for val and wikitext2)"}
    )
    batch_size: int = field(default=32, metadata={"help": "sequences per forward pass"})
    stride: int | None = field(
        default=None, metadata={"help": "wikitext2 window step (default: block_size/2)"}
    )
    data: str | None = field(
        default=None,
        metadata={"help": "--task=chat's conversations: a .jsonl file (OpenAI messages or Alpaca lines) "
                  "or a HF dataset id; each is answered from before its last assistant turn"},
    )
    max_new_tokens: int = field(
        default=64,
        metadata={"help": "--task=chat: the most tokens of an answer (it ends at <|end|> or the context)"},
    )
    json: bool = field(default=False, metadata={"help": "end stdout with one JSON line per task"})
    to: str | None = field(
        default=None,
        metadata={
            "help": "results file (default: RUN/eval.json, DIR/eval.json, or ./eval-NAME.json "
            "for a hub name)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.tasks() if t not in TASKS]
        if unknown or not self.tasks():
            raise GptforgeError(
                f"--task={self.task}: choose from {', '.join(TASKS)} (comma-separated for several)"
            )
        if self.limit is not None and self.limit < 1:
            raise GptforgeError(f"--limit={self.limit} must be at least 1, or None for all")
        if self.batch_size < 1:
            raise GptforgeError(f"--batch_size={self.batch_size} must be at least 1")
        if self.stride is not None and self.stride < 1:
            raise GptforgeError(f"--stride={self.stride} must be at least 1")
        if self.max_new_tokens < 1:
            raise GptforgeError(f"--max_new_tokens={self.max_new_tokens} must be at least 1")
        if ("chat" in self.tasks()) != bool(self.data):
            raise GptforgeError("--task=chat needs --data=CONVERSATIONS.jsonl" if not self.data else
                                f"--data={self.data} is read by --task=chat only: add it to --task")

    def tasks(self) -> list[str]:
        return [t.strip() for t in self.task.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Request:
    """A sequence to score: each of `tokens[score_from:]` given all the tokens before it (score_from >= 1)."""

    tokens: Sequence[int]
    score_from: int


@dataclass
class Scored:
    """Per scored token: its log-probability and whether it was the model's greedy (argmax) choice."""

    logprobs: np.ndarray  # float64
    greedy: np.ndarray  # bool


class Scorer:
    """A model on a device, in eval mode, at a dtype: scoring batches of requests (`score`), and answering
    batches of prompts greedily (`answer`)."""

    def __init__(self, model: GPT, device: str = "cpu", dtype: str = "float32", batch_size: int = 32,
                 progress: bool = True):
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = torch_dtype(dtype)
        self.batch_size = batch_size
        self.progress = progress

    def score(self, groups: Sequence[Sequence[Request]], desc: str = "") -> list[list[Scored]]:
        """The scores of every request, grouped as given. A group (a task's endings) is never split across
        batches; a sequence longer than the model's context loses its oldest tokens."""
        groups = self.fit(groups)
        results: list[list[Scored]] = [[] for _ in groups]
        total = sum(len(r.tokens) - 1 for group in groups for r in group)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not self.progress,
                  leave=False) as bar:
            for batch in self.batches(groups):
                rows = [r for i in batch for r in groups[i]]
                scored = self._score_rows(*self.tensors(rows))
                for i in batch:
                    results[i], scored = scored[:len(groups[i])], scored[len(groups[i]):]
                bar.update(sum(len(r.tokens) - 1 for r in rows))
        return results

    def fit(self, groups: Sequence[Sequence[Request]]) -> list[list[Request]]:
        """The requests cut to the model's context."""
        return [[fit_context(r, self.model.config.block_size) for r in group] for group in groups]

    def batches(self, groups: list[list[Request]]) -> Iterator[list[int]]:
        """Indices of the groups of each forward pass: longest first, so padding stays small and the largest
        batch (the memory peak) comes at once; at most `batch_size` sequences unless one group has more."""
        order = sorted(range(len(groups)), key=lambda i: -max(len(r.tokens) for r in groups[i]))
        batch: list[int] = []
        rows = 0
        for i in order:
            if batch and rows + len(groups[i]) > self.batch_size:
                yield batch
                batch, rows = [], 0
            batch.append(i)
            rows += len(groups[i])
        if batch:
            yield batch

    def tensors(self, rows: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of a batch on the device, right-padded; targets of -1 are not scored."""
        width = max(len(r.tokens) for r in rows) - 1
        inputs = np.zeros((len(rows), width), dtype=np.int64)
        targets = np.full((len(rows), width), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            tokens = np.asarray(r.tokens, dtype=np.int64)
            inputs[j, :len(tokens) - 1] = tokens[:-1]
            targets[j, r.score_from - 1:len(tokens) - 1] = tokens[r.score_from:]
        return torch.from_numpy(inputs).to(self.device), torch.from_numpy(targets).to(self.device)

    @torch.no_grad()
    def _score_rows(self, x: torch.Tensor, y: torch.Tensor) -> list[Scored]:
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, self.dtype, enabled=self.dtype != torch.float32):
            hidden = self.model.hidden_states(x)
            scored = y >= 0
            hidden, wanted = hidden[scored], y[scored]
            logprobs, greedy = [], []
            step = max(1, HEAD_CHUNK // self.model.config.vocab_size)
            for h, t in zip(hidden.split(step), wanted.split(step), strict=True):
                logits = self.model.head(h).float()
                logprobs.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1))
                greedy.append(logits.argmax(dim=-1) == t)
        counts = scored.sum(dim=1).tolist()
        logprob = torch.cat(logprobs).double().cpu().numpy()
        is_greedy = torch.cat(greedy).cpu().numpy()
        splits = np.cumsum(counts)[:-1]
        return [
            Scored(lp, g)
            for lp, g in zip(np.split(logprob, splits), np.split(is_greedy, splits), strict=True)
        ]

    @torch.inference_mode()
    def answer(self, prompts: Sequence[Sequence[int]], stop: int, max_new_tokens: int,
               desc: str = "") -> list[list[int]]:
        """Each prompt's greedy continuation until `stop` (left out), `max_new_tokens` or the context's end.

        At most `batch_size` prompts decode at once, each in a slot of a SlotKVCache: prefilled alone, then
        advanced a token per batched forward with the others; a finished prompt's slot goes to the next one.
        Each slot attends to its own keys only, so only the matmuls see the batch (float rounding)."""
        block = self.model.config.block_size
        too_long = [len(p) for p in prompts if not 0 < len(p) <= block]
        if too_long:
            raise GptforgeError(
                f"a {too_long[0]}-token prompt does not fit the model's block_size of {block}"
            )
        # the last answer token is never fed back: a T-token prompt has room for block + 1 - T of them
        budgets = [min(max_new_tokens, block + 1 - len(p)) for p in prompts]
        answers: list[list[int]] = [[] for _ in prompts]
        if not prompts:
            return answers
        autocast = self.dtype != torch.float32
        cache = SlotKVCache(
            self.model.config, min(self.batch_size, len(prompts)),
            self.dtype if autocast else next(self.model.parameters()).dtype, self.device,
            max_len=max(len(p) + b - 1 for p, b in zip(prompts, budgets, strict=True)),
        )
        slots: list[int | None] = [None] * len(cache.lengths)  # the prompt each slot decodes
        last = [0] * len(slots)  # the token each busy slot feeds next
        waiting = deque(range(len(prompts)))

        def take(i: int, token: int) -> bool:
            """Append `token` to answer i: whether it goes on."""
            if token == stop:
                return False
            answers[i].append(token)
            return len(answers[i]) < budgets[i]

        device_type = torch.device(self.device).type
        with (tqdm(total=len(prompts), unit="answer", desc=desc, disable=not self.progress,
                   leave=False) as bar, torch.autocast(device_type, self.dtype, enabled=autocast)):
            while waiting or any(i is not None for i in slots):
                for slot in range(len(slots)):
                    while slots[slot] is None and waiting:
                        i = waiting.popleft()
                        x = torch.tensor([prompts[i]], dtype=torch.long, device=self.device)
                        logits, _ = self.model(x, kv_cache=cache.slot(slot))
                        token = int(logits[0, -1].argmax())
                        if take(i, token):
                            cache.occupy(slot, len(prompts[i]))
                            slots[slot], last[slot] = i, token
                        else:
                            bar.update()
                busy = [slot for slot, i in enumerate(slots) if i is not None]
                if not busy:
                    continue
                cache.rows = busy
                x = torch.tensor([[last[slot]] for slot in busy], dtype=torch.long, device=self.device)
                logits, _ = self.model(x, kv_cache=cache)
                for slot, token in zip(busy, logits[:, -1].argmax(dim=-1).tolist(), strict=True):
                    i = slots[slot]
                    assert i is not None
                    if take(i, token):
                        last[slot] = token
                    else:
                        cache.free(slot)
                        slots[slot] = None
                        bar.update()
        return answers


def fit_context(request: Request, block_size: int) -> Request:
    """`request` cut to the model's context (block_size inputs + 1): the oldest context tokens go first."""
    extra = len(request.tokens) - (block_size + 1)
    if extra <= 0:
        return request
    if request.score_from - extra < 1:
        raise GptforgeError(
            f"a {len(request.tokens) - request.score_from}-token continuation does not fit the model's "
            f"block_size of {block_size}"
        )
    return Request(request.tokens[extra:], request.score_from - extra)


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of windows over n tokens: tokens[begin:end] with its tokens from
    begin + score_from on scored; every token but the first scored exactly once."""
    if stride > block_size:
        raise GptforgeError(
            f"--stride={stride} is larger than block_size={block_size}: tokens would go unscored"
        )
    spans = []
    begin, scored_to = 0, 1  # the first token has no context to be scored with
    while scored_to < n:
        end = min(begin + block_size + 1, n)
        spans.append((begin, end, scored_to - begin))
        scored_to = end
        begin += stride
    return spans


# ------------------------------------------------------------------------------------------------------------
# Tasks: each turns its data into requests and the scores into metrics.


@dataclass
class TaskInputs:
    """What a task reads besides the scorer: the model and its tokenizer, and the command's options."""

    source: Source
    opts: EvalOptions

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def encode(self, text: str, task: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text)
        except GptforgeError as e:
            raise GptforgeError(
                f"--task={task}: this model's {self.tokenizer.kind} tokenizer cannot encode the task's text "
                f"({str(e).split(';')[0]}); evaluate {task} with a GPT-2 or byte-level BPE model"
            ) from None
        if ids:
            check_token_ids(max(ids), self.source.model.config.vocab_size, f"--task={task}: the text")
        return ids

    def context_ids(self, text: str, task: str) -> list[int]:
        """A context's ids; an empty one is end-of-text, as the harnesses give it,
        so the first token has one."""
        return self.encode(text, task) or encode_prompt(self.tokenizer, "", f"--task={task}: a context")

    def cache(self) -> Path:
        return Path(self.opts.data_dir or "data") / "evals"

    def first(self, items: list) -> list:
        return items[: self.opts.limit] if self.opts.limit else items


def perplexity_metrics(tokens: np.ndarray, scored: list[Scored], tokenizer: Tokenizer) -> dict[str, Any]:
    """loss/ppl over `tokens[1:]` (the tokens the windows scored, in order)
    and bits per byte of their text."""
    logprobs = np.concatenate([s.logprobs for s in scored])
    targets = np.asarray(tokens[1:1 + len(logprobs)])
    loss = -float(logprobs.mean())
    text = targets != tokenizer.eot_token  # document separators stand for no text (all True without one)
    nats = -float(logprobs[text].sum())
    n_bytes = len(tokenizer.decode(targets[text].tolist()).encode("utf-8"))
    return {"n": len(scored), "tokens": len(logprobs), "loss": loss, "ppl": math.exp(loss),
            "bpb": nats / math.log(2) / max(n_bytes, 1)}


def window_requests(
    tokens: np.ndarray, block_size: int, stride: int, limit: int | None
) -> list[list[Request]]:
    spans = windows(len(tokens), block_size, stride)[:limit]
    return [[Request(tokens[begin:end], score_from)] for begin, end, score_from in spans]


# A task turns its data into groups of requests, and returns them with what turns their scores into metrics.
Finish = Callable[[list[list[Scored]]], dict[str, Any]]


def task_val(inputs: TaskInputs) -> tuple[list[list[Request]], Finish]:
    directory, meta = inputs.source.dataset, None
    if inputs.opts.dataset:  # a name under --data_dir, a path, or a glob of llm.c shards
        directory, meta = locate(inputs.opts.data_dir or "data", inputs.opts.dataset)
    if directory is None:
        raise GptforgeError(
            "--task=val needs a prepared dataset: name it with --dataset=NAME (e.g. openwebtext)"
        )
    with TokenDataset(directory, "val", meta) as split:  # every shard of it, in order
        tokens = np.array(split.tokens, dtype=np.int64)
    check_token_ids(int(tokens.max()), inputs.source.model.config.vocab_size, f"{directory}/val.bin")
    block = inputs.source.model.config.block_size
    groups = window_requests(tokens, block, block, inputs.opts.limit)
    return groups, lambda scored: perplexity_metrics(tokens, [g[0] for g in scored], inputs.tokenizer)


def task_wikitext2(inputs: TaskInputs) -> tuple[list[list[Request]], Finish]:
    block = inputs.source.model.config.block_size
    stride = inputs.opts.stride or max(1, block // 2)
    windows(0, block, stride)  # a bad stride fails before the work
    text = eval_sets.wikitext2(mirror_dir(inputs.opts.mirror), inputs.cache())
    tokens = np.asarray(inputs.encode(text, "wikitext2"), dtype=np.int64)
    groups = window_requests(tokens, block, stride, inputs.opts.limit)
    return groups, lambda scored: {**perplexity_metrics(tokens, [g[0] for g in scored], inputs.tokenizer),
                                   "stride": stride}


def task_lambada(inputs: TaskInputs) -> tuple[list[list[Request]], Finish]:
    groups = []
    for text in inputs.first(eval_sets.lambada(mirror_dir(inputs.opts.mirror), inputs.cache())):
        context, word = text.rsplit(" ", 1)
        ids = inputs.context_ids(context, "lambada")
        groups.append([Request(ids + inputs.encode(" " + word, "lambada"), len(ids))])

    def finish(scored: list[list[Scored]]) -> dict[str, Any]:
        targets = [g[0] for g in scored]
        return {
            "n": len(targets),
            "acc": float(np.mean([s.greedy.all() for s in targets])),
            "ppl": math.exp(-float(np.mean([s.logprobs.sum() for s in targets]))),
        }

    return groups, finish


def task_hellaswag(inputs: TaskInputs) -> tuple[list[list[Request]], Finish]:
    tasks = inputs.first(eval_sets.hellaswag(mirror_dir(inputs.opts.mirror), inputs.cache()))
    groups = []
    for task in tasks:
        ids = inputs.context_ids(task.context, "hellaswag")
        groups.append(
            [Request(ids + inputs.encode(" " + ending, "hellaswag"), len(ids)) for ending in task.endings]
        )

    def finish(scored: list[list[Scored]]) -> dict[str, Any]:
        correct = correct_norm = 0
        for task, endings in zip(tasks, scored, strict=True):
            sums = np.array([s.logprobs.sum() for s in endings])
            correct += int(np.argmax(sums)) == task.label
            correct_norm += int(np.argmax(sums / [len(s.logprobs) for s in endings])) == task.label
        return {"n": len(tasks), "acc": correct / len(tasks), "acc_norm": correct_norm / len(tasks)}

    return groups, finish


TASK_FUNCTIONS: dict[str, Callable[[TaskInputs], tuple[list[list[Request]], Finish]]] = {
    "val": task_val, "wikitext2": task_wikitext2, "lambada": task_lambada, "hellaswag": task_hellaswag,
}


# The chat task decodes rather than scores: its conversations are read and rendered before any task runs
# (a bad line fails before the work), then answered by the scorer's model.


@dataclass(frozen=True)
class ChatExample:
    """A held-out conversation: the prompt's ids (ending with the assistant's marker) and the reference
    answer, the content of its last assistant turn."""

    where: str  # file:line
    prompt: list[int]
    reference: str


def normalize(text: str) -> str:
    """`normalized`'s comparison form: lowercased, every run of whitespace one space, and the punctuation
    (ASCII's, `string.punctuation`) and spaces at either end stripped. Inner punctuation and articles stay."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def chat_examples(inputs: TaskInputs) -> tuple[list[ChatExample], int]:
    """The first --limit conversations of --data as prompts and references, and how many were left out
    because their prompt does not fit the context."""
    source, data = inputs.source, inputs.opts.data
    template = source.chat_template
    if template is None:
        raise GptforgeError(f"--task=chat needs a finetuned assistant: {source.name} has no chat template "
                            "(finetune it with `gptforge sft`)")
    block = source.model.config.block_size
    examples, dropped = [], 0
    for where, record in itertools.islice(read_records(str(data)), inputs.opts.limit):
        try:
            messages = to_messages(record, where)
            last = max(i for i, m in enumerate(messages)
                       if isinstance(m, dict) and m.get("role") == "assistant")
            check_message(messages[last])
            prompt, _ = template.render(inputs.tokenizer, messages[:last], add_generation_prompt=True)
        except GptforgeError as e:
            message = str(e)
            raise GptforgeError(message if message.startswith(where) else f"{where}: {message}") from None
        if len(prompt) > block:
            dropped += 1
            continue
        examples.append(ChatExample(where, prompt, messages[last]["content"]))
    if not examples:
        raise GptforgeError(f"--data={data} has no conversation whose prompt fits block_size={block}"
                            + (f" ({dropped} longer ones left out)" if dropped else ""))
    if dropped:
        print(f"--task=chat: {dropped} conversation(s) whose prompt is longer than block_size={block} "
              "left out", file=sys.stderr)
    return examples, dropped


def task_chat(
    inputs: TaskInputs, scorer: Scorer, examples: list[ChatExample], dropped: int
) -> dict[str, Any]:
    template = inputs.source.chat_template
    assert template is not None  # chat_examples checked
    answers = scorer.answer([e.prompt for e in examples], template.end, inputs.opts.max_new_tokens, "chat")
    texts = [inputs.tokenizer.decode(a) for a in answers]
    pairs = list(zip(texts, (e.reference for e in examples), strict=True))
    return {
        "n": len(examples),
        "exact": float(np.mean([a == r for a, r in pairs])),
        "normalized": float(np.mean([normalize(a) == normalize(r) for a, r in pairs])),
        "dropped": dropped,
        "max_new_tokens": inputs.opts.max_new_tokens,
    }


# ------------------------------------------------------------------------------------------------------------
# The command


def results_path(opts: EvalOptions, source: Source) -> Path:
    if opts.to:
        return Path(opts.to)
    if source.directory is not None:
        return source.directory / RESULTS_FILE
    return Path(f"eval-{Path(source.name).name}.json")


def evaluate(opts: EvalOptions, out: TextIO | None = None) -> dict[str, dict[str, Any]]:
    """Run each task of `opts`, print a table (and JSON lines), merge the results into the results file."""
    out = out or sys.stdout
    device, dtype = opts.placement()
    source = opts.load()
    path = results_path(opts, source)
    check_writable(path, "--to", directory=False)
    saved = read_results(path)  # before any work: a file that cannot take the results fails now
    inputs = TaskInputs(source, opts)
    chat = chat_examples(inputs) if "chat" in opts.tasks() else None  # a bad conversation fails now
    scorer = Scorer(quantize(source.model, opts.quantize), device, dtype, opts.batch_size, opts.progress)
    results = {}
    for task in opts.tasks():
        if task == "chat":
            assert chat is not None
            metrics = task_chat(inputs, scorer, *chat)
        else:
            groups, finish = TASK_FUNCTIONS[task](inputs)
            metrics = finish(scorer.score(groups, task))
        results[task] = {"task": task, **metrics}
    about = {"model": source.name, "iter_num": source.iter_num, "device": device, "dtype": dtype,
             "quantize": opts.quantize, "limit": opts.limit}
    atomic_write_text(
        path, json.dumps({**saved, **{t: {**m, **about} for t, m in results.items()}}, indent=2) + "\n"
    )
    out.write(format_table(results) + f"\nwrote {path}\n")
    if opts.json:
        for metrics in results.values():
            out.write(json.dumps(metrics) + "\n")
    out.flush()
    return results


def read_results(path: Path) -> dict[str, Any]:
    """The results already in `path` (one entry per task; a new run of a task replaces its entry)."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise GptforgeError(f"{path} is not a JSON results file; move it away or pass --to=FILE")
    return saved


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per task, one column per metric that any task has."""
    columns = [c for c in ("n", "tokens", "acc", "acc_norm", "exact", "normalized", "loss", "ppl", "bpb")
               if any(c in m for m in results.values())]
    rows = [["task", *columns]]
    for task, metrics in results.items():
        rows.append([task, *(_cell(metrics.get(c)) for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"

