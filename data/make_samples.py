"""Write the committed sample data in data/samples/ (deterministic: same output on every run).

    python data/make_samples.py [--rows 300] [--out data/samples]

One file per domain, each in a different source format (see data/README.md):
  math.jsonl      prompt_response  arithmetic and algebra word problems, step-by-step `reasoning`
  code.parquet    alpaca           small Python tasks; `output` starts with a <think> block
  science.jsonl   sharegpt         short science Q&A, some with a system turn and a <think> block
  chat.jsonl      messages         multi-turn chat, some assistant turns with `reasoning`
and a held-out set for evaluation (data/eval/, not used to build the project tokenizer):
  math_eval.jsonl messages         math problems drawn apart from the training ones, with final answers
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "coins"]
SYSTEMS = [
    "You are a careful math tutor. Show your steps.",
    "You are a concise assistant.",
    "You are a patient teacher who explains things simply.",
]


# ---- math: prompt_response with reasoning ----------------------------------------------------------


def math_row(rng: random.Random) -> dict:
    kind = rng.choice(["add", "sub", "mul", "share", "linear", "rect", "percent", "speed"])
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(3, 90), rng.randint(3, 90)
        prompt = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        steps = [f"{name} starts with {a} {item}.", f"Finding {b} more means adding: {a} + {b} = {a + b}."]
        answer = a + b
    elif kind == "sub":
        a = rng.randint(20, 120)
        b = rng.randint(1, a - 1)
        prompt = f"{name} had {a} {item} and gave away {b}. How many are left?"
        steps = [f"Start with {a}.", f"Giving away {b} means subtracting: {a} - {b} = {a - b}."]
        answer = a - b
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        prompt = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        steps = [f"Each of the {a} boxes holds {b} {item}.", f"Total = {a} x {b} = {a * b}."]
        answer = a * b
    elif kind == "share":
        b, q = rng.randint(2, 9), rng.randint(2, 20)
        a = b * q
        prompt = f"{name} shares {a} {item} equally among {b} friends. How many does each friend get?"
        steps = [f"Sharing equally means dividing {a} by {b}.", f"{a} / {b} = {q}, since {b} x {q} = {a}."]
        answer = q
    elif kind == "linear":
        x, a, b = rng.randint(-9, 15), rng.randint(2, 9), rng.randint(-20, 20)
        c = a * x + b
        prompt = f"Solve for x: {a}x + {b} = {c}".replace("+ -", "- ")
        steps = [
            f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.",
            f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
            f"Check: {a} * {x} + {b} = {a * x + b}, which matches {c}.",
        ]
        answer = x
    elif kind == "rect":
        w, h = rng.randint(2, 30), rng.randint(2, 30)
        prompt = f"A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?"
        steps = [f"Area = width x height = {w} x {h} = {w * h} square cm.", f"Perimeter = 2 x ({w} + {h}) = {2 * (w + h)} cm."]
        answer = f"area {w * h} square cm, perimeter {2 * (w + h)} cm"
    elif kind == "percent":
        p, n = rng.choice([10, 20, 25, 50, 75]), rng.randint(2, 40) * 4
        prompt = f"What is {p}% of {n}?"
        steps = [f"{p}% means {p}/100.", f"{n} x {p} / 100 = {n * p} / 100 = {n * p / 100:g}."]
        answer = f"{n * p / 100:g}"
    else:
        v, t = rng.randint(20, 90), rng.randint(2, 6)
        prompt = f"A train travels at {v} km/h for {t} hours. How far does it go?"
        steps = [f"Distance = speed x time.", f"{v} km/h x {t} h = {v * t} km."]
        answer = f"{v * t} km"
    row = {"prompt": prompt, "reasoning": "\n".join(steps), "response": f"The answer is {answer}."}
    if rng.random() < 0.2:
        row["system"] = rng.choice(SYSTEMS)
    return row


# ---- code: alpaca with <think> in the output -----------------------------------------------------

CODE_TASKS = [
    ("sum_of_squares", "returns the sum of the squares of a list of numbers", "nums",
     "return sum(x * x for x in nums)", "Square each number and add them up; a generator expression keeps it short."),
    ("count_vowels", "counts the vowels in a string", "text",
     "return sum(1 for ch in text.lower() if ch in 'aeiou')", "Lower-case the text and count characters that are vowels."),
    ("is_palindrome", "checks whether a string reads the same backwards", "text",
     "cleaned = ''.join(ch.lower() for ch in text if ch.isalnum())\n    return cleaned == cleaned[::-1]",
     "Keep only letters and digits, lower-case them, and compare with the reversed string."),
    ("fizzbuzz", "returns the FizzBuzz word for a number", "n",
     "if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
     "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)", "Test divisibility by 15 first, then 3, then 5."),
    ("factorial", "computes n factorial iteratively", "n",
     "result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result",
     "Multiply the numbers from 2 to n; the empty product for 0 and 1 is 1."),
    ("dedupe", "removes duplicates from a list while keeping the first occurrence order", "items",
     "seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n            seen.add(x)\n"
     "            out.append(x)\n    return out", "Track seen values in a set and append unseen ones in order."),
    ("word_count", "counts how often each word occurs in a sentence", "sentence",
     "counts = {}\n    for word in sentence.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
     "Split on whitespace and count with a dictionary."),
    ("running_max", "returns the running maximum of a list", "nums",
     "out, best = [], None\n    for x in nums:\n        best = x if best is None or x > best else best\n"
     "        out.append(best)\n    return out", "Keep the best value so far and append it at every step."),
    ("flatten", "flattens a list of lists by one level", "rows",
     "return [x for row in rows for x in row]", "A nested comprehension visits each row, then each element."),
    ("gcd", "computes the greatest common divisor of two integers", "a, b",
     "while b:\n        a, b = b, a % b\n    return abs(a)", "Euclid's algorithm: replace (a, b) by (b, a mod b) until b is 0."),
]


def code_row(rng: random.Random) -> dict:
    name, what, args, body, idea = rng.choice(CODE_TASKS)
    example = {
        "nums": f"[{', '.join(str(rng.randint(-9, 9)) for _ in range(rng.randint(2, 6)))}]",
        "text": repr(rng.choice(["Racecar", "hello world", "A man, a plan", "Ouro loops"])),
        "n": str(rng.randint(1, 30)),
        "items": f"[{', '.join(str(rng.randint(0, 4)) for _ in range(rng.randint(3, 7)))}]",
        "sentence": repr(rng.choice(["the cat saw the dog", "to be or not to be", "a b a c b a"])),
        "rows": "[[1, 2], [3], [4, 5, 6]]",
        "a, b": f"{rng.randint(2, 200)}, {rng.randint(2, 200)}",
    }[args]
    code = f"def {name}({args}):\n    {body}"
    thinking = f"The task: a function that {what}.\n{idea}\nI will call it {name} and test it on {example}."
    output = f"<think>\n{thinking}\n</think>\n\n```python\n{code}\n```\n\nFor example, `{name}({example})`."
    style = rng.choice(["Write a Python function that {w}.", "In Python, implement `{n}`, which {w}.", "Give me Python code that {w}."])
    system = rng.choice(SYSTEMS) if rng.random() < 0.2 else ""
    row = {"instruction": style.format(w=what, n=name), "input": "", "output": output, "system": system}
    if rng.random() < 0.3:
        row["input"] = f"Use the name {name} and include an example call with {example}."
    return row


# ---- science: sharegpt ----------------------------------------------------------------------------

SCIENCE = [
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and shorter blue wavelengths scatter much more than red ones (Rayleigh scattering), so blue light reaches our eyes from every direction of the sky."),
    ("What is photosynthesis?", "Photosynthesis is how plants, algae and some bacteria turn light energy, water and carbon dioxide into glucose and oxygen, using chlorophyll in their chloroplasts."),
    ("Why do we have seasons?", "Earth's axis is tilted about 23.4 degrees, so through the year each hemisphere alternately leans toward the Sun and gets more direct sunlight and longer days."),
    ("What is an atom made of?", "An atom has a nucleus of protons and neutrons, surrounded by electrons; the number of protons sets which element it is."),
    ("How do vaccines work?", "A vaccine shows the immune system a harmless piece or version of a pathogen, so it makes antibodies and memory cells and can respond fast to a real infection."),
    ("What is the speed of light?", "In a vacuum light travels at about 299,792 kilometres per second, and nothing carrying information can go faster."),
    ("Why does ice float?", "Water expands when it freezes into a hexagonal crystal, so ice is about 9% less dense than liquid water and floats."),
    ("What causes tides?", "Mostly the Moon's gravity: it pulls harder on the near side of Earth than the far side, raising two bulges of ocean that Earth rotates through each day."),
    ("What is DNA?", "DNA is a double-helix molecule whose sequence of four bases (A, T, C, G) stores the genetic instructions for building and running an organism."),
    ("What is Newton's second law?", "The net force on an object equals its mass times its acceleration, F = m a."),
    ("Why do metals conduct electricity?", "Their outer electrons are not bound to single atoms but move freely through the lattice, so they can carry a current."),
    ("What is a black hole?", "A region where so much mass is packed so tightly that gravity lets nothing escape from inside its event horizon, not even light."),
    ("What is pH?", "pH measures how acidic or basic a solution is: it is minus the log of the hydrogen ion concentration, 7 is neutral, lower is acidic, higher is basic."),
    ("How does a rainbow form?", "Sunlight is refracted entering raindrops, reflected inside them and refracted again on leaving; each wavelength bends differently, spreading the colours out."),
    ("What are tectonic plates?", "Large slabs of Earth's lithosphere that slowly move over the mantle; their collisions and separations cause earthquakes, volcanoes and mountains."),
    ("What is entropy?", "Entropy measures how many microscopic arrangements match a system's macroscopic state; in an isolated system it never decreases."),
]
QUESTION_STYLES = ["{q}", "Can you explain: {q}", "Quick question: {q}", "{q} Please keep it short."]


def science_row(rng: random.Random) -> dict:
    q, a = rng.choice(SCIENCE)
    turns = []
    if rng.random() < 0.25:
        turns.append({"from": "system", "value": rng.choice(SYSTEMS)})
    turns.append({"from": "human", "value": rng.choice(QUESTION_STYLES).format(q=q)})
    if rng.random() < 0.5:
        thought = f"The question is about: {q.lower().rstrip('?')}.\nRecall the key mechanism, then state it in one or two sentences."
        turns.append({"from": "gpt", "value": f"<think>\n{thought}\n</think>\n\n{a}"})
    else:
        turns.append({"from": "gpt", "value": a})
    return {"conversations": turns}


# ---- chat: messages, multi-turn -------------------------------------------------------------------

TOPICS = [
    ("I want to start running. Any tips?", "Start slowly: run-walk intervals three times a week, keep an easy pace where you can talk, and add about 10% per week.",
     "How do I avoid getting sore?", "Warm up for five minutes, do not increase distance too fast, sleep well, and take rest days between runs."),
    ("Can you suggest a quick dinner?", "Try a vegetable stir-fry: fry garlic and ginger, add sliced vegetables and tofu, then soy sauce and a little honey. Serve with rice.",
     "I have no tofu. What else works?", "Eggs, chickpeas, chicken or cashews all work; add them before the sauce so they cook through."),
    ("How do I focus better when studying?", "Work in 25-minute blocks with short breaks, silence your phone, and write down one clear goal for each block.",
     "What if I still get distracted?", "Note the distraction on paper and return to the task; after the block, deal with the list."),
    ("What should I pack for a weekend hike?", "Water, snacks, a rain jacket, a warm layer, a map, a first-aid kit, sun protection and a charged phone.",
     "Is a headlamp necessary?", "Yes, if there is any chance you finish after sunset; it is light and can save you from a bad situation."),
    ("Write a haiku about autumn.", "Crimson leaves let go\nthe wind carries them homeward\nbranches hold the sky",
     "Now one about winter.", "Snow hushes the street\nfootprints fill before morning\nthe lamp hums alone"),
    ("How do I politely decline a meeting?", "Thank them, say you cannot attend, and offer an alternative such as reading the notes or meeting another time.",
     "Can you write a short example?", "Thanks for the invite! I can't make it on Thursday, but I'd be glad to read the notes or meet next week."),
    ("What does <|im_end|> mean in a chat transcript?", "It is a special marker some chat formats use to end a message; in normal text it is just characters.",
     "And <think>?", "Some models open their reasoning with that tag; typed in a message, it is plain text."),
]


def chat_row(rng: random.Random) -> dict:
    u1, a1, u2, a2 = rng.choice(TOPICS)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    messages += [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}]
    if rng.random() < 0.7:
        messages += [{"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    if rng.random() < 0.3:
        messages[-1] = {**messages[-1], "reasoning": "The user wants a short, practical answer. Give the key points only."}
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="rows per domain")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples")
    parser.add_argument("--eval-out", type=Path, default=Path(__file__).resolve().parent / "eval")
    parser.add_argument("--eval-rows", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make, seed in (("math", math_row, 1), ("science", science_row, 2), ("chat", chat_row, 3)):
        rng = random.Random(seed)
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(args.rows):
                f.write(json.dumps(make(rng), ensure_ascii=False) + "\n")
    rng = random.Random(4)
    code = [code_row(rng) for _ in range(args.rows)]
    pq.write_table(pa.Table.from_pylist(code), args.out / "code.parquet")
    print(f"wrote {args.rows} rows per domain to {args.out}")
    write_math_eval(args.eval_out / "math_eval.jsonl", args.eval_rows)


def write_math_eval(path: Path, rows: int) -> None:
    """Held-out math problems as chat messages (another seed than the training samples)."""
    rng = random.Random(11)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            row = math_row(rng)
            assistant = {"role": "assistant", "content": row["response"], "reasoning": row["reasoning"]}
            f.write(json.dumps({"messages": [{"role": "user", "content": row["prompt"]}, assistant]}) + "\n")
    print(f"wrote {rows} held-out math conversations to {path}")


if __name__ == "__main__":
    main()
