"""Compose the offline prompt pool for self-distillation (`specbench train-data`).

Writes workloads/pool-train/prompts.jsonl and workloads/pool-heldout/prompts.jsonl: several
hundred instructions across the eight MT-Bench categories, composed from the
templates and subject lists below (written for specbench), deterministically
(fixed seed), with about one prompt in ten held out, in a shuffled order so that the first N
prompts (`--limit N`) mix all categories. Held-out prompts never
appear in the training pool, and neither file repeats a built-in workload prompt.

    python scripts/make_prompt_pool.py
    python scripts/make_prompt_pool.py --extra   # workloads/pool-train-extra: more training prompts

`--extra` leaves both files as they are and writes `pool-train-extra`: further combinations
of the same templates and lists, for more self-distillation data. It never takes a
held-out prompt, nor any prompt on a subject, topic, role or coding task that a held-out
prompt is about (so held-out prompts stay about subjects no extra prompt covers); the
templates filled with random names and numbers (reasoning, math, extraction) draw fresh
fills and keep only texts not already in any pool.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
SEED = 6
HELDOUT_EVERY = 10  # one prompt in ten, after a seeded shuffle
EXTRA_SEED = 16
EXTRA_PER_CATEGORY = 150  # at most, for pool-train-extra

WRITING_FORMS = [
    "a short story", "a four-line poem", "a haiku", "a limerick", "a persuasive paragraph", "a product description",
    "a short speech", "a diary entry", "a letter of complaint", "a thank-you note", "a blog post introduction",
    "a short news report", "a fable with a moral", "an opening paragraph for a mystery novel", "a recipe introduction",
]
WRITING_SUBJECTS = [
    "a lighthouse that stopped working", "a cat who wants to be a chef", "the first day of spring", "a lost umbrella",
    "a city without cars", "a robot learning to paint", "a grandmother's garden", "a train that runs on time",
    "the last bookshop in town", "a dragon afraid of heights", "moving to a new country", "a rainy football match",
    "a kitchen experiment gone wrong", "a school trip to a museum", "a village festival", "an old bicycle",
    "a night without electricity", "a friendly ghost", "a farmer and a clever fox", "a message in a bottle",
]
WRITING_EXTRA = [
    "Write {form} about {subject}.",
    "Please write {form} about {subject}. Keep it under 150 words.",
    "Compose {form} on the theme of {subject}, in a cheerful tone.",
    "Write {form} about {subject}, for children aged eight.",
]

ROLES = [
    ("a pirate captain", "explain to new crew members how to keep the ship clean"),
    ("a museum guide", "describe the most famous painting in the museum"),
    ("a personal trainer", "give a beginner their first week of exercises"),
    ("a medieval knight", "describe your morning routine"),
    ("a travel agent", "recommend a weekend trip to a couple who likes hiking"),
    ("a detective", "explain how you solved the case of the missing necklace"),
    ("a chef in a busy restaurant", "tell a new cook what to prepare before service"),
    ("a friendly librarian", "help a teenager choose a book for the summer"),
    ("an astronaut on the space station", "describe what you see out of the window"),
    ("a sports commentator", "narrate the final minute of a close basketball game"),
    ("a wise old owl", "give advice to a young rabbit who is afraid of the dark"),
    ("a customer service agent", "help a customer whose parcel has not arrived"),
    ("a history teacher", "introduce the ancient Egyptians to your class"),
    ("a gardener", "explain how to grow tomatoes on a balcony"),
    ("a job interviewer", "ask the candidate three questions about teamwork"),
    ("a weather presenter", "give the forecast for a stormy weekend"),
    ("a shopkeeper in a small village", "tell a visitor about the local news"),
    ("a doctor", "explain to a patient why sleep matters"),
    ("a tour guide in Rome", "describe the Colosseum to tourists"),
    ("a ship's navigator", "explain how you would find your way without GPS"),
    ("Sherlock Holmes", "explain what you deduce about a visitor with muddy boots"),
    ("a movie director", "explain to actors how the opening scene should feel"),
    ("a zookeeper", "describe feeding time for the penguins"),
    ("a startup founder", "pitch your app that helps people share leftover food"),
]
ROLE_FORMS = [
    "Pretend to be {role}. {Task}.",
    "You are {role}. Stay in character and {task}.",
    "Act as {role} and {task}.",
]

REASONING = [
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain.",
    "{n1} people are standing in a line. {name} is number {k} from the front. How many people are behind {name}?",
    "A farmer has {n1} sheep. All but {k} run away. How many sheep are left? Explain your reasoning.",
    "{name} is taller than {name2}, and {name2} is taller than {name3}. Who is the shortest? Explain.",
    "If it takes {k} machines {k} minutes to make {k} widgets, how long would it take {n1} machines to make {n1} widgets?",
    "A clock shows {h} o'clock. What is the angle between the hour hand and the minute hand?",
    "There are {n1} apples in a basket. You take away {k}. How many apples do you have?",
    "{name} has {k} sisters, and each sister has one brother. How many brothers does {name} have? Explain.",
    "Which is heavier, {n1} kilograms of feathers or {n1} kilograms of {c}? Explain.",
    "In a race, {name} overtakes the person in {ord} place. What place is {name} in now?",
]
REASON_WORDS = {
    "a": ["roses", "cats", "engineers", "squares", "violins"],
    "b": ["flowers", "animals", "people", "shapes", "instruments"],
    "c": ["red things", "pets", "musicians", "blue objects", "old things"],
}
NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Mateo", "Nora"]
ORDINALS = ["second", "third", "fourth", "last"]

MATH = [
    "What is {a} multiplied by {b}? Show your working.",
    "Solve for x: {a}x + {b} = {c}.",
    "A shop sells pens at {a} cents each. How much do {b} pens cost in dollars?",
    "What is {p}% of {c}?",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "A train travels {c} km in {a} hours. What is its average speed?",
    "Find the sum of all integers from 1 to {c}.",
    "What is the greatest common divisor of {c} and {d}?",
    "A recipe needs {a} eggs for {b} people. How many eggs are needed for {c} people?",
    "If a number is increased by {p}% and becomes {c}, what was the original number?",
    "What is the probability of rolling a total of {s} with two fair six-sided dice?",
    "Compute the area of a circle with radius {a} cm.",
    "Is {c} a prime number? Explain how you checked.",
    "The average of {a}, {b} and x is {m}. What is x?",
]

CODING_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
    "returns the n-th Fibonacci number", "removes duplicates from a list while keeping the order",
    "finds the largest element in a list", "checks whether a word is a palindrome", "sorts a list of tuples by their second item",
    "merges two sorted lists", "counts how often each word appears in a text", "converts Celsius to Fahrenheit",
    "computes the factorial of a number", "flattens a nested list", "finds the second smallest number in a list",
    "checks whether brackets in a string are balanced", "implements binary search", "reads a CSV file and prints the first row",
    "returns the common elements of two lists",
]
LANGUAGES = ["Python", "JavaScript", "C", "Java", "Go", "Rust"]
CODING_FORMS = [
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}, and explain how it works.",
    "Show me {lang} code that {task}. Include a short example.",
]
CODING_EXTRA = [
    "Explain the difference between a list and a tuple in Python.",
    "What does the following Python code print? `print([x * 2 for x in range(4)])`",
    "Explain what a race condition is, with a small example.",
    "What is the time complexity of binary search, and why?",
    "Explain recursion to a beginner programmer, with an example.",
    "What is the difference between a stack and a queue?",
    "Explain what an SQL JOIN does, with an example query.",
    "Find the bug: `def add_all(xs): total = 0; for x in xs: total = x; return total`",
    "Explain what Git branches are used for.",
    "What is the difference between `==` and `is` in Python?",
    "Write an SQL query that returns the ten most recent orders from a table called orders.",
    "Explain what a hash table is and why lookups are fast.",
]

PEOPLE = ["Maria Lopez", "James Carter", "Aiko Tanaka", "Omar Haddad", "Sofia Rossi", "Liam O'Brien", "Priya Nair", "Erik Larsen"]
CITIES = ["Lisbon", "Toronto", "Osaka", "Nairobi", "Lyon", "Melbourne", "Krakow", "Austin", "Seville", "Dublin"]
COMPANIES = ["Brightline Foods", "Northwind Tools", "Blue Harbor Travel", "Greenleaf Energy", "Pixel Forge", "Atlas Bikes"]
PRODUCTS = ["a coffee grinder", "a pair of running shoes", "a desk lamp", "a backpack", "a kettle", "a phone case"]
EXTRACTION = [
    "Extract the names, cities and dates from this text as a JSON list: \"{p1} moved to {c1} on {d1}. A year later, {p2} visited {p1} in {c1} and then flew to {c2} on {d2}.\"",
    "From the following review, extract the product, the rating and one complaint: \"I bought {prod} last month. It works well, but it is louder than I expected. I would give it {r} out of 5.\"",
    "Summarise in one sentence: \"{co} reported revenue of {n} million dollars this quarter, up {k}% from last year. The company plans to open a new office in {c1} and hire {m} people.\"",
    "List the company names and the amounts mentioned: \"{co} paid {n} thousand euros to {co2} for software, while {co2} bought supplies worth {m} thousand euros from {co}.\"",
    "Identify the sentiment (positive, negative or neutral) of each sentence: \"The hotel in {c1} was clean. The staff were rude. Breakfast was served at seven.\"",
    "Extract every number from this text and say what it refers to: \"The bridge in {c1} is {n} metres long, took {k} years to build and carries {m} cars a day.\"",
    "Turn this note into a to-do list: \"Call {p1} about the meeting, buy {prod} before Friday, book tickets to {c2}, and send the report to {co}.\"",
    "What is the main topic of this paragraph, and who is mentioned? \"{p1}, a teacher from {c1}, started a free reading club for adults. After {k} months, {m} people had joined, including {p2}.\"",
    "Extract the meeting time, place and participants: \"Hi {p2}, let's meet on {d1} at {h} pm at the {co} office in {c2}. {p1} will join us.\"",
    "Convert this sentence into a table with columns name, city, age: \"{p1} ({k}) lives in {c1}; {p2} ({m}) lives in {c2}.\"",
]
DATES = ["3 March 2019", "12 July 2021", "28 January 2018", "9 October 2020", "15 May 2022", "1 December 2017"]

STEM_TOPICS = [
    "photosynthesis", "how vaccines train the immune system", "why the sky is blue", "how a refrigerator works",
    "Newton's third law", "the water cycle", "what DNA is", "how batteries store energy", "plate tectonics",
    "why the Moon has phases", "how airplanes stay in the air", "the difference between weather and climate",
    "what an atom is made of", "how solar panels produce electricity", "what black holes are", "how antibiotics work",
    "the greenhouse effect", "why ice floats on water", "how sound travels", "what a neural network is",
    "how GPS finds your position", "what entropy means", "how the heart pumps blood", "what causes earthquakes",
]
STEM_FORMS = [
    "Explain {topic} in simple terms.",
    "Explain {topic} to a ten-year-old.",
    "Give a short, accurate explanation of {topic}, with one everyday example.",
    "What are the key ideas behind {topic}? Answer in three bullet points.",
]

HUMANITIES_TOPICS = [
    "the causes of the French Revolution", "why the printing press mattered", "the main ideas of Stoicism",
    "the role of the Silk Road in history", "what the Renaissance was", "the difference between a democracy and a republic",
    "why people study philosophy", "the importance of the Magna Carta", "how the Industrial Revolution changed cities",
    "the main themes of Shakespeare's Hamlet", "what supply and demand means", "the history of the Olympic Games",
    "why languages change over time", "the influence of ancient Greek theatre", "what utilitarianism says",
    "the causes of the First World War", "the role of museums in society", "how the Roman Empire was governed",
    "what inflation is and why it happens", "the impact of social media on politics",
]
HUMANITIES_FORMS = [
    "Describe {topic}.",
    "Write a short essay outline about {topic}.",
    "Summarise {topic} in a paragraph.",
    "What are two different views on {topic}? Explain both fairly.",
]


def writing(rng: random.Random) -> list[str]:
    out = []
    for i, subject in enumerate(WRITING_SUBJECTS):
        for form in rng.sample(WRITING_FORMS, 3):
            out.append(rng.choice(WRITING_EXTRA).format(form=form, subject=subject))
    return out


def roleplay(rng: random.Random) -> list[str]:
    return [form.format(role=role, task=task, Task=task[0].upper() + task[1:]) for role, task in ROLES for form in rng.sample(ROLE_FORMS, 2)]


def reasoning(rng: random.Random) -> list[str]:
    out = []
    for template in REASONING:
        for _ in range(5):
            names = rng.sample(NAMES, 3)
            out.append(
                template.format(
                    a=rng.choice(REASON_WORDS["a"]), b=rng.choice(REASON_WORDS["b"]), c=rng.choice(REASON_WORDS["c"] + ["stone", "iron"]),
                    n1=rng.randint(6, 40), k=rng.randint(2, 5), name=names[0], name2=names[1], name3=names[2],
                    h=rng.randint(1, 11), ord=rng.choice(ORDINALS),
                )
            )
    return out


def math(rng: random.Random) -> list[str]:
    out = []
    for template in MATH:
        for _ in range(4):
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            out.append(
                template.format(
                    a=a, b=b, c=rng.randint(31, 480), d=rng.choice([12, 18, 24, 36, 42, 60]), p=rng.choice([5, 10, 15, 20, 25, 40]),
                    s=rng.randint(2, 12), m=rng.randint(5, 25),
                )
            )
    return out


def coding(rng: random.Random) -> list[str]:
    out = [rng.choice(CODING_FORMS).format(lang=lang, task=task) for task in CODING_TASKS for lang in rng.sample(LANGUAGES, 3)]
    return out + CODING_EXTRA


def extraction(rng: random.Random) -> list[str]:
    out = []
    for template in EXTRACTION:
        for _ in range(5):
            p1, p2 = rng.sample(PEOPLE, 2)
            c1, c2 = rng.sample(CITIES, 2)
            co, co2 = rng.sample(COMPANIES, 2)
            d1, d2 = rng.sample(DATES, 2)
            out.append(
                template.format(
                    p1=p1, p2=p2, c1=c1, c2=c2, co=co, co2=co2, d1=d1, d2=d2, prod=rng.choice(PRODUCTS), r=rng.randint(1, 5),
                    n=rng.randint(12, 900), k=rng.randint(2, 40), m=rng.randint(15, 300), h=rng.randint(1, 6),
                )
            )
    return out


def explained(topics: list[str], forms: list[str], rng: random.Random, per_topic: int) -> list[str]:
    return [form.format(topic=topic) for topic in topics for form in rng.sample(forms, per_topic)]


def turns_of(workload: str) -> set[str]:
    """Every turn of a shipped workload's prompts.jsonl."""
    lines = (WORKLOADS / workload / "prompts.jsonl").read_text().splitlines()
    return {turn for line in lines if line.strip() for turn in json.loads(line)["turns"]}


def main() -> None:
    rng = random.Random(SEED)
    pool = {
        "writing": writing(rng),
        "roleplay": roleplay(rng),
        "reasoning": reasoning(rng),
        "math": math(rng),
        "coding": coding(rng),
        "extraction": extraction(rng),
        "stem": explained(STEM_TOPICS, STEM_FORMS, rng, 2),
        "humanities": explained(HUMANITIES_TOPICS, HUMANITIES_FORMS, rng, 3),
    }
    builtin = turns_of("builtin")
    rows, seen = [], set(builtin)
    for category, texts in pool.items():
        for text in texts:
            if text in seen:
                continue
            seen.add(text)
            rows.append({"id": f"{category}-{len([r for r in rows if r['category'] == category]) + 1}", "category": category, "turns": [text]})
    rng.shuffle(rows)
    heldout = [r for i, r in enumerate(rows) if i % HELDOUT_EVERY == 0]
    train = [r for i, r in enumerate(rows) if i % HELDOUT_EVERY != 0]
    for name, split in (("pool-train", train), ("pool-heldout", heldout)):
        # shuffled order, so `--limit N` takes a mix of all categories
        (WORKLOADS / name / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split))
    counts = {c: sum(r["category"] == c for r in rows) for c in pool}
    print(f"{len(train)} training prompts, {len(heldout)} held out; per category {counts}")


def keyed_combinations(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every (subject key, text) the listed templates make; random fills drawn afresh, keyed by text."""
    combos = {
        "writing": [(subject, extra.format(form=form, subject=subject))
                    for subject, form, extra in itertools.product(WRITING_SUBJECTS, WRITING_FORMS, WRITING_EXTRA)],
        "roleplay": [(role + task, form.format(role=role, task=task, Task=task[0].upper() + task[1:]))
                     for role, task in ROLES for form in ROLE_FORMS],
        "coding": [(task, form.format(lang=lang, task=task)) for task, lang, form in itertools.product(CODING_TASKS, LANGUAGES, CODING_FORMS)],
        "stem": [(topic, form.format(topic=topic)) for topic in STEM_TOPICS for form in STEM_FORMS],
        "humanities": [(topic, form.format(topic=topic)) for topic in HUMANITIES_TOPICS for form in HUMANITIES_FORMS],
    }
    for name, make in (("reasoning", reasoning), ("math", math), ("extraction", extraction)):
        texts = [text for _ in range(8) for text in make(rng)]  # 8 fresh fills of every template
        combos[name] = [(text, text) for text in texts]
    return combos


def extra() -> None:
    rng = random.Random(EXTRA_SEED)
    heldout = turns_of("pool-heldout")
    taken = turns_of("builtin") | turns_of("pool-train") | heldout
    rows = []
    for category, pairs in keyed_combinations(rng).items():
        held_keys = {key for key, text in pairs if text in heldout}
        fresh = list(dict.fromkeys(text for key, text in pairs if key not in held_keys and text not in taken))
        for i, text in enumerate(rng.sample(fresh, min(EXTRA_PER_CATEGORY, len(fresh)))):
            rows.append({"id": f"extra-{category}-{i + 1}", "category": category, "turns": [text]})
    rng.shuffle(rows)
    (WORKLOADS / "pool-train-extra" / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = {c: sum(r["category"] == c for r in rows) for c in dict.fromkeys(r["category"] for r in rows)}
    print(f"{len(rows)} extra training prompts; per category {counts}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="store_true", help="write pool-train-extra instead (pool-train and pool-heldout stay)")
    extra() if parser.parse_args().extra else main()
