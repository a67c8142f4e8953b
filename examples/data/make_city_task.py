"""Generate the shipped toy SFT task: name the city mentioned in a sentence (chat format).

    python examples/data/make_city_task.py    # writes city_train.jsonl and city_eval.jsonl beside this file

Sentences come from templates x cities with a fixed seed; the eval file uses cities and templates in new
combinations (every eval city also appears in training, in other sentences), so a few steps of LoRA
teach the answer format and held-out loss and exact match can be measured.
"""

import json
import random
from pathlib import Path

CITIES = ["Paris", "Tokyo", "Lima", "Nairobi", "Oslo", "Cairo", "Denver", "Hanoi", "Porto", "Quito", "Seoul",
          "Dublin", "Perth", "Accra", "Zagreb", "Bogota", "Kyoto", "Austin", "Lyon", "Turin", "Riga", "Minsk",
          "Dakar", "Manila", "Havana", "Lagos", "Vienna", "Prague", "Berlin", "Madrid"]
TEMPLATES = [
    "I flew to {c} last week and the food was great.",
    "My sister just moved to {c} for a new job.",
    "The conference will be held in {c} next spring.",
    "We spent three rainy days in {c} before heading home.",
    "Have you ever tried the coffee in {c}?",
    "The train from {c} was two hours late.",
    "Our new office in {c} opens on Monday.",
    "She grew up in a small flat in {c}.",
    "Tickets to {c} are cheap in November.",
    "The museum in {c} has a famous garden.",
]
SYSTEM = "Answer with the name of the city only."


def record(sentence, city):
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Which city is mentioned? {sentence}"},
                         {"role": "assistant", "content": city}]}


def main():
    rng = random.Random(0)
    pairs = [(t, c) for t in TEMPLATES for c in CITIES]
    rng.shuffle(pairs)
    held_out, train = pairs[:60], pairs[60:]
    here = Path(__file__).parent
    for name, rows in (("city_train.jsonl", train), ("city_eval.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(record(t.format(c=c), c)) + "\n" for t, c in rows))
        print(here / name, len(rows))


if __name__ == "__main__":
    main()
