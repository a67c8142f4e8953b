"""Generate the shipped toy preference task: name the mentioned city, in capital letters.

    python examples/data/make_city_prefs.py    # writes city_prefs_train.jsonl and city_prefs_eval.jsonl

The system prompt asks for the city's name in capital letters. The chosen answer follows it ("LIMA");
the rejected one either ignores the format ("Lima") or names another city of the sentence's pool in
capitals ("OSLO"), so the preference is about following the instruction and about being right. The
eval file holds six cities that never appear in training, so a rise in held-out preference accuracy
is generalization, not memory.
"""

import json
import random
from pathlib import Path

from make_city_task import CITIES, TEMPLATES

SYSTEM = "Answer with the name of the city only, in capital letters."
HELD_OUT = ["Hanoi", "Dublin", "Riga", "Dakar", "Prague", "Kyoto"]


def record(sentence, city, rejected):
    return {"prompt": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": f"Which city is mentioned? {sentence}"}],
            "chosen": [{"role": "assistant", "content": city.upper()}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def rows(cities, rng):
    out = []
    for city in cities:
        for t in TEMPLATES:
            other = rng.choice([c for c in cities if c != city])
            out.append(record(t.format(c=city), city, city if rng.random() < 0.5 else other.upper()))
    rng.shuffle(out)
    return out


def main():
    rng = random.Random(0)
    train = rows([c for c in CITIES if c not in HELD_OUT], rng)
    held_out = rows(HELD_OUT, rng)
    here = Path(__file__).parent
    for name, data in (("city_prefs_train.jsonl", train), ("city_prefs_eval.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(here / name, len(data))


if __name__ == "__main__":
    main()
