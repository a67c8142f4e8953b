"""Training data: JSONL formats for SFT and preference pairs, span-based label masking, best-fit-decreasing packing.

Every record becomes a list of text *segments*, each trained or not (prompt, system and user text are
not; completions and assistant turns are). The segments are joined, the whole text is tokenized once
with character offsets, and a token is trained when its characters overlap a trained segment, so the
ids are exactly those the model sees at inference and the mask never depends on finding a response
template inside token ids (the trap of TRL's old DataCollatorForCompletionOnlyLM). Labels are -100
everywhere else, including padding; position 0 is never a target. EOS is appended and trained after
every completion (for chats the template's end-of-turn token is trained, plus EOS when the turn does
not end in a special token), so the model learns to stop even when pad_token == eos_token.

Formats, one JSON object per line:
    {"prompt": ..., "completion": ...}                      prompt/completion (strings, or message lists)
    {"instruction": ..., "input": ..., "output": ...}        Alpaca
    {"messages": [{"role": ..., "content": ...}, ...]}      chat (every assistant turn is trained)
    {"conversations": [{"from": "human", "value": ...}]}    ShareGPT, mapped to messages
    {"text": ...}                                           plain text, every token trained
A `LabelTemplate` turns labelled records (say `text` and `label` columns) into prompt/completion pairs.
Preference pairs (DPO) use TRL's formats: prompt/chosen/rejected as strings or message lists, or
chosen/rejected alone with the prompt implicit in their shared beginning; each side is an Example.

Packing: best-fit decreasing puts examples into bins of max_length tokens; a packed row carries
seq_ids, so the model's block-diagonal causal mask keeps documents apart and positions restart at 0
in each (plain SDPA, no FlashAttention varlen kernel needed).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100

ALPACA = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class DataError(ValueError):
    """A record cannot be turned into a training example; the message names file and line."""


@dataclass
class LabelTemplate:
    """Labelled data -> prompt/completion: `prompt` and `completion` are str.format templates over the
    record's columns, e.g. LabelTemplate("Review: {text}\\nSentiment:", " {label}")."""

    prompt: str
    completion: str

    def __call__(self, record: dict, where: str) -> dict:
        try:
            return {"prompt": self.prompt.format(**record), "completion": self.completion.format(**record)}
        except KeyError as e:
            raise DataError(f"{where}: the template needs a field {e.args[0]!r}; the record has "
                            f"{sorted(record)}") from None
        except (IndexError, AttributeError, ValueError) as e:  # "{0}", "{text.x}", "{text"
            raise DataError(f"{where}: the template {self.prompt!r} / {self.completion!r} cannot be filled from "
                            f"the record ({e})") from None


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained; labels[0] is always IGNORE
    source: str  # "file:line"
    answer_start: int = 0  # first trained token of the last completion: the prompt for exact-match eval

    def __len__(self):
        return len(self.input_ids)

    @property
    def trained(self) -> int:
        return sum(1 for y in self.labels if y != IGNORE)


def read_jsonl(path) -> list[tuple[str, dict]]:
    """[(\"file:line\", record)] for the non-blank lines of a JSONL file; errors name file and line.

    Lines must be UTF-8 (a byte-order mark at the start is skipped) and hold JSON objects whose strings are
    valid Unicode: json accepts a lone surrogate escape ("\\ud800"), which tokenizers fail on later."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8")) + 1
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            if "\\u" in line and (bad := _lone_surrogate(record)):
                raise DataError(f"{path}:{n}: {bad[0]} holds a lone surrogate {bad[1]} (an unpaired \\ud800-\\udfff "
                                "escape, which is not Unicode text)")
            records.append((f"{path}:{n}", record))
    if not records:
        raise DataError(f"{path}: the dataset is empty (no JSON line)")
    return records


def _lone_surrogate(record: dict) -> tuple[str, str] | None:
    """(where, escape) of the first string of the record, key or value, holding an unpaired UTF-16 surrogate
    (UTF-8 cannot encode it, so only a JSON escape puts one there); None when there is none."""
    stack = [("", record)]
    while stack:
        at, value = stack.pop()
        if isinstance(value, dict):
            for key in value:
                if (bad := _surrogate(key)) is not None:
                    return (f"a key of field {at}" if at else "a key"), bad
            stack += reversed([(f"{at}.{k}" if at else k, v) for k, v in value.items()])
        elif isinstance(value, list):
            stack += reversed([(f"{at}[{i}]", v) for i, v in enumerate(value)])
        elif isinstance(value, str) and (bad := _surrogate(value)) is not None:
            return f"field {at}", bad
    return None


def _surrogate(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"\\u{ord(text[e.start]):04x}"
    return None


# -- records -> segments ------------------------------------------------------------------------------

def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
    else:
        messages = []
        if not isinstance(record["conversations"], list) or not record["conversations"]:
            raise DataError(f"{where}: 'conversations' must be a non-empty list")
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: a ShareGPT turn needs 'from' (one of {sorted(SHAREGPT_ROLES)}) "
                                f"and a string 'value', got {turn!r}")
            messages.append({"role": role, "content": turn["value"]})
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise DataError(f"{where}: message {i} must have a role (system, user or assistant) and a "
                            f"string content, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return messages


def chat_segments(messages: list[dict], tokenizer, where: str = "") -> list[tuple[str, bool]]:
    """The rendered chat split into (text, trained) segments: each assistant turn, from the end of the
    generation prompt to its end-of-turn token (trailing whitespace after it is not trained).

    Spans come from rendering growing prefixes of the conversation, which must render as prefixes of
    the whole text (true of ChatML, Llama 3, Mistral and most templates; an error otherwise)."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    segments, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True, tokenize=False) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise DataError(f"{where}: the chat template does not render conversation prefixes as prefixes "
                            f"of the whole (turn {i}), so assistant spans cannot be located")
        end = max(len(upto.rstrip()), len(before))
        segments += [(full[done:len(before)], False), (full[len(before):end], True)]
        done = end
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def record_segments(record: dict, tokenizer, where: str, template: LabelTemplate | None = None,
                    chat: bool = False) -> tuple[list[tuple[str, bool]], bool]:
    """(segments, is_chat) for one record; `chat` renders prompt/completion and Alpaca records through
    the tokenizer's chat template as a user turn and an assistant turn."""
    if template is not None:
        record = template(record, where)
    if "messages" in record or "conversations" in record:
        return chat_segments(_messages(record, where), tokenizer, where), True
    if "instruction" in record and "output" in record:
        for key in ("instruction", "output", "input"):
            if not isinstance(record.get(key, ""), (str, type(None)) if key == "input" else str):
                raise DataError(f"{where}: Alpaca field {key!r} must be a string, got {type(record[key]).__name__}")
        inp = record.get("input") or ""
        if chat:
            prompt = record["instruction"] + (f"\n\n{inp}" if inp else "")
        else:
            prompt = ALPACA.format(instruction=record["instruction"],
                                   with_input=", paired with an input that provides further context" if inp else "",
                                   input_block=f"### Input:\n{inp}\n\n" if inp else "")
        record = {"prompt": prompt, "completion": record["output"]}
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            messages = _messages({"messages": prompt + completion}, where)
            segments = chat_segments(messages, tokenizer, where)
            # only the completion's turns are trained
            n_prompt_turns = sum(1 for m in prompt if m["role"] == "assistant")
            return _untrain_first(segments, n_prompt_turns), True
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        if not completion:
            raise DataError(f"{where}: empty completion, so nothing would be trained")
        if chat:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return chat_segments(messages, tokenizer, where), True
        return [(prompt, False), (completion, True)], False
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return [(record["text"], True)], False
    raise DataError(f"{where}: unknown record format with fields {sorted(record)}; expected prompt/completion, "
                    "instruction/output (Alpaca), messages, conversations (ShareGPT) or text")


def _untrain_first(segments, n):
    out = []
    for text, trained in segments:
        if trained and n > 0:
            n -= 1
            trained = False
        out.append((text, trained))
    return out


# -- segments -> tokens -------------------------------------------------------------------------------

def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (BOS for Llama), found by encoding."""
    with_special, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer, is_chat: bool, source: str = "") -> Example:
    """One Example from (text, trained) segments: BOS once (chat templates write their own), the whole text
    tokenized with offsets, labels on the tokens overlapping trained characters, EOS appended and trained."""
    text, spans, pos = "", [], 0
    for seg, trained in segments:
        if trained:
            spans.append((pos, pos + len(seg)))
        text += seg
        pos += len(seg)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = []
    k = 0
    for tid, (s, e) in zip(ids, enc.offsets):
        e = max(e, s + 1)
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        labels.append(tid if k < len(spans) and spans[k][0] < e else IGNORE)
    prefix = [] if is_chat else [i for i in _bos_prefix(tokenizer) if not ids or ids[0] != i]
    ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
    eos = tokenizer.eos_token_id
    last = max((t for t in range(len(labels)) if labels[t] != IGNORE), default=None)
    if eos is not None and last is not None and (not is_chat or ids[last] not in tokenizer.special_ids):
        ids.insert(last + 1, eos)
        labels.insert(last + 1, eos)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    answer_start = 0
    for t in range(len(labels) - 1, 0, -1):  # start of the last trained run
        if labels[t] != IGNORE and labels[t - 1] == IGNORE:
            answer_start = t
            break
    return Example(ids, labels, source, answer_start)


def make_example(record: dict, tokenizer, where: str = "", template: LabelTemplate | None = None,
                 chat: bool = False) -> Example:
    segments, is_chat = record_segments(record, tokenizer, where, template, chat)
    return tokenize_segments(segments, tokenizer, is_chat, where)


def _limit(ex: Example, max_length: int | None, truncation: str) -> tuple[Example | None, bool]:
    """(the example cut to max_length, or None when it is dropped, and whether it was cut)."""
    if max_length is None or len(ex) <= max_length:
        return ex, False
    if truncation == "drop":
        return None, False
    ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source, ex.answer_start)
    return (ex if ex.trained else None), True


def _check_vocab(ex: Example, vocab_size: int | None, where: str):
    if vocab_size is not None and max(ex.input_ids) >= vocab_size:
        raise DataError(f"{where}: token id {max(ex.input_ids)} is outside the model's vocabulary of "
                        f"{vocab_size}: the tokenizer does not belong to this model")
    if ex.trained == 0:
        raise DataError(f"{where}: no trained token (every label is masked); check the record's fields")


def load_examples(path, tokenizer, max_length: int | None = None, truncation: str = "truncate",
                  template: LabelTemplate | None = None, chat: bool = False, vocab_size: int | None = None,
                  report=print) -> list[Example]:
    """Read a JSONL file into Examples. Examples longer than max_length are cut to it ("truncate") or left
    out ("drop"); either way the count is reported. An example with no trained token is an error."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    examples, cut, dropped = [], 0, 0
    for where, record in read_jsonl(path):
        ex = make_example(record, tokenizer, where, template, chat)
        _check_vocab(ex, vocab_size, where)
        ex, was_cut = _limit(ex, max_length, truncation)
        cut, dropped = cut + was_cut, dropped + (ex is None)
        if ex is not None:
            examples.append(ex)
    if cut or dropped:
        report(f"{path}: {cut} examples longer than {max_length} tokens truncated, {dropped} dropped")
    if not examples:
        raise DataError(f"{path}: no example left (all {dropped} were longer than max_length {max_length})")
    return examples


# -- preference pairs ---------------------------------------------------------------------------------

@dataclass
class PreferencePair:
    """One prompt with a chosen and a rejected completion, each a whole Example (prompt + completion,
    only the completion trained), so a pair is two rows of the same batch."""

    chosen: Example
    rejected: Example
    source: str


def _implicit_prompt(chosen, rejected, where: str):
    """TRL's implicit-prompt format: no 'prompt', the shared beginning of chosen and rejected is the prompt.
    Message lists split after the last shared message; strings at the last space before they differ
    (the space goes with the completions)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        n = chosen.rfind(" ", 0, n + 1) if n < min(len(chosen), len(rejected)) else n
        n = max(n, 0)
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: with no 'prompt' field, chosen and rejected must share a beginning (the "
                        f"prompt) and differ after it; they share {n} {'messages' if isinstance(chosen, list) else 'characters'}")
    return chosen[:n], chosen[n:], rejected[n:]


def make_pair(record: dict, tokenizer, where: str = "", chat: bool = False) -> PreferencePair:
    """A preference record -> PreferencePair. Formats (TRL's): prompt/chosen/rejected as strings or as
    message lists (chosen/rejected holding the assistant turn(s)), or chosen/rejected alone (implicit prompt)."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"the record has {sorted(record)}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    if prompt is None:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, where)
    if type(prompt) is not type(chosen):
        raise DataError(f"{where}: 'prompt' must be a {type(chosen).__name__} like 'chosen' and 'rejected'")
    return PreferencePair(make_example({"prompt": prompt, "completion": chosen}, tokenizer, where, chat=chat),
                          make_example({"prompt": prompt, "completion": rejected}, tokenizer, where, chat=chat),
                          where)


def load_preferences(path, tokenizer, max_length: int | None = None, truncation: str = "truncate",
                     chat: bool = False, vocab_size: int | None = None, report=print) -> list[PreferencePair]:
    """Read a JSONL file of preference records. A pair whose chosen or rejected sequence is longer than
    max_length is cut ("truncate", keeping the start) or left out ("drop"); the counts are reported."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    pairs, cut, dropped = [], 0, 0
    for where, record in read_jsonl(path):
        pair = make_pair(record, tokenizer, where, chat)
        limited = []
        for ex in (pair.chosen, pair.rejected):
            _check_vocab(ex, vocab_size, where)
            limited.append(_limit(ex, max_length, truncation))
        (chosen, cut_c), (rejected, cut_r) = limited
        if chosen is None or rejected is None:
            dropped += 1
            continue
        cut += cut_c or cut_r
        pairs.append(PreferencePair(chosen, rejected, where))
    if cut or dropped:
        report(f"{path}: {cut} pairs longer than {max_length} tokens truncated, {dropped} dropped")
    if not pairs:
        raise DataError(f"{path}: no pair left (all {dropped} were longer than max_length {max_length})")
    return pairs


# -- packing and batches ------------------------------------------------------------------------------

def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of indices) of total length <= max_length. Longest first, each
    into the fullest bin that still has room, else a new bin; ties broken by index (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin) kept sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            room, b = max_length - n, len(bins) - 1
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            room -= n
        bisect.insort(free, (room, b))
    return bins


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> a batch. A row of several examples is packed (seq_ids); rows are right-padded
    to the longest with label IGNORE (packed batches: padding is its own segment; otherwise an
    attention_mask). A single unpadded row needs neither and gets plain causal attention."""
    packed = any(len(r) > 1 for r in rows)
    lengths = [sum(len(e) for e in r) for r in rows]
    T = max(lengths)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    seq = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, e in enumerate(row):
            ids[b, t:t + len(e)] = torch.tensor(e.input_ids)
            labels[b, t:t + len(e)] = torch.tensor(e.labels)
            seq[b, t:t + len(e)] = d
            t += len(e)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["seq_ids"] = seq
    elif min(lengths) < T:
        batch["attention_mask"] = (seq >= 0).long()
    return batch


def pad_id_for(tokenizer) -> int:
    """Padding id: never read (padding is masked out of attention and loss), so any valid id will do."""
    for i in (tokenizer.pad_token_id, tokenizer.token_to_id(tokenizer.unk_token), tokenizer.eos_token_id, 0):
        if i is not None:
            return i
    return 0


def trained_tokens(batch: dict) -> int:
    """The tokens a collated batch trains on: the labels, shifted by one, that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
