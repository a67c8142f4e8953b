"""Generate three small evaluation tasks with train / validation / test splits and preference pairs.

    cd examples/data && python make_tasks.py    # writes tasks/<name>/{train,validation,test}.jsonl,
                                                # prefs_{train,validation}.jsonl and task.json

city: name the city in a sentence (a fixed output format). Template x city combinations are shuffled with a
fixed seed and dealt into disjoint splits, so every test sentence is a combination never seen in training.
sentiment: label a templated review positive, negative or neutral. Reviews are built from subject x opinion
phrase banks (neutral ones are factual sentences with no opinion word); classes are balanced in every split
and the test reviews are about subjects that never appear in train or validation.
arithmetic: two or three steps of + and - (at most one *) in a word problem, answered by a rationale that
ends with "The answer is N."; every intermediate result is in 1..99 and no problem repeats across splits.

Preference pairs (train and validation only, one per example) prefer the correct answer over a wrong one:
another city of the same split, another label, or a rationale with a slip of 1 or 2 in one step, carried
through to a wrong final answer. Running the script twice gives byte-identical files.
"""

import json
import random
from pathlib import Path

from make_city_task import CITIES, TEMPLATES

SEED = 0
CITY_SYSTEM = "Answer with the name of the city only."
CITY_COUNTS = {"train": 160, "validation": 40, "test": 60}

SENT_SYSTEM = "Classify the sentiment of the review as positive, negative or neutral. Answer with one word."
LABELS = ["positive", "negative", "neutral"]
SENT_COUNTS = {"train": 240, "validation": 60, "test": 90}
# per domain: subjects for train/validation, subjects held out for test, and factual (opinion-free) sentences
DOMAINS = {
    "product": (["blender", "backpack", "phone case", "desk lamp", "kettle", "keyboard", "water bottle",
                 "charger", "umbrella", "mattress"], ["toaster", "office chair"],
                ["The {s} arrived on {day}.", "The {s} came in a {color} box.", "I bought the {s} {when}.",
                 "The {s} was delivered to my office.", "My brother ordered the same {s} {when}."]),
    "restaurant": (["pasta", "soup", "pizza", "burger", "curry", "salad", "steak", "risotto", "omelette",
                    "sandwich"], ["noodle bowl", "fish stew"],
                   ["I ordered the {s} at {time}.", "The {s} was served on a {color} plate.",
                    "The {s} is on the {day} menu.", "We shared the {s} at a table by the window.",
                    "The {s} was the first thing we ordered {when}."]),
    "movie": (["film", "documentary", "thriller", "comedy", "cartoon", "sequel", "drama", "musical",
               "horror film", "animated short"], ["western", "biopic"],
              ["I watched the {s} on {day} evening.", "The {s} runs for {mins} minutes.",
               "The {s} was released in {year}.", "We saw the {s} at the cinema on Main Street.",
               "The {s} was shown on television {when}."]),
}
OPINIONS = {
    "positive": (["excellent", "wonderful", "fantastic", "superb", "delightful", "outstanding", "impressive",
                  "lovely"],
                 ["The {s} was {adj}.", "Honestly, the {s} was {adj}.", "I really loved the {s}.",
                  "The {s} was {adj}; I would recommend it to anyone.", "We were thrilled with the {s}."]),
    "negative": (["terrible", "awful", "disappointing", "dreadful", "poor", "frustrating", "mediocre",
                  "unpleasant"],
                 ["The {s} was {adj}.", "Honestly, the {s} was {adj}.", "I really disliked the {s}.",
                  "The {s} was {adj}; I would not recommend it to anyone.", "We were unhappy with the {s}."]),
}
FILLERS = {"day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
           "color": ["white", "blue", "green", "grey", "brown", "black"],
           "when": ["last week", "in March", "two days ago", "last month", "on Friday", "yesterday"],
           "time": ["noon", "seven", "eight thirty", "six", "one o'clock"],
           "mins": ["88", "95", "102", "110", "124", "131"], "year": ["1998", "2004", "2011", "2016", "2021"]}

MATH_SYSTEM = "Solve the problem. Think step by step, then end with 'The answer is N.'"
MATH_COUNTS = {"train": 240, "validation": 60, "test": 90, "test_large": 400}
NAMES = [("Mia", "She"), ("Omar", "He"), ("Lena", "She"), ("Ravi", "He"), ("Sofia", "She"), ("Tom", "He"),
         ("Aisha", "She"), ("Ben", "He"), ("Yuki", "She"), ("Carlos", "He"), ("Nora", "She"), ("Sam", "He")]
OBJECTS = ["pencils", "stickers", "marbles", "apples", "cards", "coins", "stamps", "cookies", "books", "shells",
           "balloons", "beads"]
CONTAINERS = ["boxes", "bags", "jars", "packs"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from {f}", "wins {n} more"]
LOSSES = ["gives {n} to {f}", "loses {n}", "sells {n}", "gives {n} away"]
DOUBLE = "doubles the number of {o} {p} has"


# -- shared ---------------------------------------------------------------------------------------------

def chat(system, user, answer, **extra):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}], "answer": extra.pop("ref", answer), **extra}


def pref(record, wrong):
    return {"prompt": record["messages"][:2], "chosen": record["messages"][2:],
            "rejected": [{"role": "assistant", "content": wrong}]}


def write(name, splits, prefs, info):
    out = Path(__file__).parent / "tasks" / name
    out.mkdir(parents=True, exist_ok=True)
    files = {**splits, **{f"prefs_{k}": v for k, v in prefs.items()}}
    for split, rows in files.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"name": name, **info, "counts": {k: len(v) for k, v in files.items()}}
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    print(out, info["counts"])


# -- city -------------------------------------------------------------------------------------------------

def city_task(rng):
    pairs = [(t, c) for t in TEMPLATES for c in CITIES]
    rng.shuffle(pairs)
    splits, i = {}, 0
    for split in ("test", "validation", "train"):  # test first: the 40 combinations left over go unused
        splits[split], i = pairs[i:i + CITY_COUNTS[split]], i + CITY_COUNTS[split]
    rows = {k: [chat(CITY_SYSTEM, f"Which city is mentioned? {t.format(c=c)}", c) for t, c in v]
            for k, v in splits.items()}
    prefs = {}
    for split in ("train", "validation"):
        pool = sorted({c for _, c in splits[split]})
        prefs[split] = [pref(r, rng.choice([c for c in pool if c != r["answer"]])) for r in rows[split]]
    write("city", {k: rows[k] for k in ("train", "validation", "test")}, prefs, {
        "description": "Name the city in a templated sentence. Template x city combinations are dealt into "
                       "disjoint splits, so test sentences are combinations unseen in training.",
        "scorer": "exact", "max_new_tokens": 8})


# -- sentiment ------------------------------------------------------------------------------------------

def review(label, domain, subject, rng):
    facts = DOMAINS[domain][2]
    fill = {k: rng.choice(v) for k, v in FILLERS.items()}
    fact = rng.choice(facts).format(s=subject, **fill)
    if label == "neutral":
        if rng.random() < 0.4:
            return fact + " " + rng.choice([f for f in facts if f.format(s=subject, **fill) != fact]).format(
                s=subject, **fill)
        return fact
    adjectives, shapes = OPINIONS[label]
    opinion = rng.choice(shapes).format(s=subject, adj=rng.choice(adjectives))
    r = rng.random()  # one opinion sentence alone, or next to a factual one in either order
    return opinion if r < 0.5 else f"{fact} {opinion}" if r < 0.75 else f"{opinion} {fact}"


def sentiment_task(rng):
    seen, rows = set(), {}
    for split in ("train", "validation", "test"):
        held_out = split == "test"
        rows[split] = []
        for label in LABELS:
            made = 0
            while made < SENT_COUNTS[split] // len(LABELS):
                domain = rng.choice(sorted(DOMAINS))
                subject = rng.choice(DOMAINS[domain][1 if held_out else 0])
                text = review(label, domain, subject, rng)
                if text not in seen:
                    seen.add(text)
                    rows[split].append(chat(SENT_SYSTEM, f"Review: {text}", label))
                    made += 1
        rng.shuffle(rows[split])
    prefs = {s: [pref(r, rng.choice([x for x in LABELS if x != r["answer"]])) for r in rows[s]]
             for s in ("train", "validation")}
    write("sentiment", rows, prefs, {
        "description": "Classify templated product, restaurant and movie reviews; opinions come from banks of "
                       "positive and negative phrases, neutral reviews are factual sentences. Classes are "
                       "balanced and test reviews are about subjects never seen in train or validation.",
        "scorer": "label", "labels": LABELS, "max_new_tokens": 4})


# -- arithmetic -------------------------------------------------------------------------------------------

def problem(rng):
    """(question, name, steps) with steps [(a, op, b)] applied left to right, or None when a result leaves 1..99."""
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    if rng.random() < 0.3:  # the multiplication is the start: k containers of m
        k, m = rng.randint(2, 6), rng.randint(3, 9)
        opening = f"{name} has {k} {rng.choice(CONTAINERS)} with {m} {obj} in each."
        steps, value, n_ops = [(k, "*", m)], k * m, rng.randint(1, 2)
    else:
        value = rng.randint(5, 30)
        opening, steps, n_ops = f"{name} has {value} {obj}.", [], rng.choice([2, 2, 3])
    clauses = []
    for _ in range(n_ops):
        kind = rng.choice(["+", "-"] if any(op == "*" for _, op, _ in steps) else ["+", "-", "+", "-", "*"])
        n = 2 if kind == "*" else rng.randint(2, 15)
        phrase = DOUBLE if kind == "*" else rng.choice(GAINS if kind == "+" else LOSSES)
        clauses.append(phrase.format(n=n, f=friend, o=obj, p=he.lower()))
        steps.append((value, kind, n))
        value = {"+": value + n, "-": value - n, "*": value * n}[kind]
        if not 0 < value < 100:
            return None
    said = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and then " + clauses[-1]
    return f"{opening} {he} {said}. How many {obj} does {name} have now?", name, steps


def rationale(name, steps, slip=None):
    """(text, results) of the worked steps; slip=(i, d) adds d to step i's result and carries it through."""
    parts, results = [], []
    for i, (a, op, b) in enumerate(steps):
        a = results[-1] if results else a
        results.append({"+": a + b, "-": a - b, "*": a * b}[op] + (slip[1] if slip and slip[0] == i else 0))
        if i == 0:
            parts.append(f"{name} starts with " + (f"{a} * {b} = {results[0]}." if op == "*" else f"{a}."))
        if i or op != "*":
            parts.append(f"{a} {op} {b} = {results[-1]}.")
    return " ".join(parts), results


def arithmetic_task(rng):
    seen, rows, prefs = set(), {}, {}
    for split in MATH_COUNTS:  # test_large comes last, so the other splits are unchanged by it
        rows[split], prefs[split] = [], []
        while len(rows[split]) < MATH_COUNTS[split]:
            made = problem(rng)
            if made is None or made[0] in seen:
                continue
            question, name, steps = made
            seen.add(question)
            why, results = rationale(name, steps)
            rows[split].append(chat(MATH_SYSTEM, question, f"{why} The answer is {results[-1]}.",
                                    ref=str(results[-1]), rationale=why))
            while True:  # a slip of 1 or 2 in one step, every wrong result still positive
                wrong, bad = rationale(name, steps, (rng.randrange(len(steps)), rng.choice([-2, -1, 1, 2])))
                if min(bad) > 0:
                    break
            prefs[split].append(pref(rows[split][-1], f"{wrong} The answer is {bad[-1]}."))
    write("arithmetic", rows, {s: prefs[s] for s in ("train", "validation")}, {
        "description": "Word problems of two or three + / - steps (at most one *) over name and object banks, "
                       "answered by a worked rationale ending 'The answer is N.'; intermediates stay in 1..99 "
                       "and no problem repeats across splits.",
        "scorer": "number", "max_new_tokens": 96})


def main():
    city_task(random.Random(SEED))
    sentiment_task(random.Random(SEED + 1))
    arithmetic_task(random.Random(SEED + 2))


if __name__ == "__main__":
    main()
