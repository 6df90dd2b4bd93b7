"""The standard evaluation sets, read from their canonical files: HellaSwag (validation), LAMBADA (OpenAI's
test file, as used for GPT-2) and WikiText-2 (raw, test).

Each file comes from a local mirror (`--mirror` / $GPTFORGE_DATA_MIRROR, laid out as `evals/<file>`) when it
has one, else from its canonical URL into DATA_DIR/evals/, sha256-checked either way (mirror.py). HellaSwag is
read in two formats: the official `hellaswag_val.jsonl` (what the published GPT-2 figures use), or llama.cpp's
compact text file (6 lines per task: context, label, 4 endings) whose contexts are preprocessed the
lm-eval-harness way and so differ from the raw `ctx` in about two thirds of the tasks. This module knows
nothing about models, and nothing of token files: it imports no other module of the data package.
"""

import bz2
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptforge.atomic import atomic_write_bytes
from gptforge.errors import GptforgeError
from gptforge.mirror import Remote, fetch, file_sha256, in_mirror

HELLASWAG_JSONL = Remote(
    url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    mirror_path="evals/hellaswag_val.jsonl",
    sha256="0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
)
HELLASWAG_TEXT = Remote(  # llama.cpp's compact format, read only from a mirror
    url="https://raw.githubusercontent.com/klosax/hellaswag_text_data/main/hellaswag_val_full.txt.bz2",
    mirror_path="evals/hellaswag_val_full.txt.bz2",
    sha256="50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
)
LAMBADA = Remote(
    url="https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    mirror_path="evals/lambada_test.jsonl",
    sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
)
# The archive llama.cpp's get-wikitext-2.sh fetches, identical to Salesforce's original.
WIKITEXT2_ZIP = Remote(
    url="https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",
    mirror_path="evals/wikitext-2-raw-v1.zip",
    sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
)
WIKITEXT2_TEST = Remote(
    url=WIKITEXT2_ZIP.url + " (wikitext-2-raw/wiki.test.raw inside)",
    mirror_path="evals/wiki.test.raw",
    sha256="173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
)
WIKITEXT2_MEMBER = "wikitext-2-raw/wiki.test.raw"
HELLASWAG_TASKS = 10042


@dataclass(frozen=True)
class Choice:
    """A multiple-choice task: which ending continues the context; `label` is the right one's index."""

    context: str
    endings: tuple[str, ...]
    label: int


def hellaswag(mirror: Path | None, cache: Path) -> list[Choice]:
    """HellaSwag's validation tasks in the official order: the official jsonl if the mirror has it, else the
    mirror's compact text file, else the official jsonl downloaded into `cache`."""
    if in_mirror(HELLASWAG_JSONL, mirror) is None and (text := in_mirror(HELLASWAG_TEXT, mirror)) is not None:
        return read_hellaswag_text(text)
    jsonl = fetch(HELLASWAG_JSONL, mirror, cache / Path(HELLASWAG_JSONL.mirror_path).name)
    return read_hellaswag_jsonl(jsonl)


def read_hellaswag_jsonl(path: Path) -> list[Choice]:
    """Tasks from the official jsonl: the raw `ctx` (as llm.c scores it), the four `endings`, the `label`."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                tasks.append(Choice(row["ctx"], tuple(row["endings"]), int(row["label"])))
            except (ValueError, KeyError, TypeError):
                raise GptforgeError(
                    f"{path}:{number} is not a HellaSwag jsonl row (ctx, endings, label)"
                ) from None
    return tasks


def read_hellaswag_text(path: Path) -> list[Choice]:
    """Tasks from llama.cpp's text format (bzip2-compressed if the name ends in .bz2): 6 lines per task."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise GptforgeError(f"{path} has {len(lines)} lines, not 6 per task (context, label, 4 endings)")
    tasks = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1]
        if label not in ("0", "1", "2", "3"):
            raise GptforgeError(f"{path}:{i + 2} should be a label 0-3, not {label[:20]!r}")
        tasks.append(Choice(lines[i], tuple(lines[i + 2:i + 6]), int(label)))
    return tasks


def lambada(mirror: Path | None, cache: Path) -> list[str]:
    """The 5,153 passages of OpenAI's LAMBADA test file; the task is each passage's last word."""
    path = fetch(LAMBADA, mirror, cache / Path(LAMBADA.mirror_path).name)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def wikitext2(mirror: Path | None, cache: Path) -> str:
    """The text of WikiText-2's raw test file: the mirror's copy, else taken out of the downloaded archive."""
    path = in_mirror(WIKITEXT2_TEST, mirror)
    if path is None:
        path = cache / Path(WIKITEXT2_TEST.mirror_path).name
        if not (path.is_file() and file_sha256(path) == WIKITEXT2_TEST.sha256):
            archive = fetch(WIKITEXT2_ZIP, mirror, cache / Path(WIKITEXT2_ZIP.mirror_path).name)
            with zipfile.ZipFile(archive) as z:
                data = z.read(WIKITEXT2_MEMBER)
            if hashlib.sha256(data).hexdigest() != WIKITEXT2_TEST.sha256:
                raise GptforgeError(
                    f"{WIKITEXT2_MEMBER} in {archive} is not the official file (sha256 differs)"
                )
            atomic_write_bytes(path, data)
    return path.read_text(encoding="utf-8")
