#!/usr/bin/env python3
"""The two prompt sets of bench/spec_decode.sh, as vLLM custom-dataset JSONL (one {"prompt": ...} per
line; `ironllm bench serve --dataset-name custom` applies the chat template through the server):

- repetitive.jsonl: answers that copy the prompt, the case n-gram prompt lookup is made for. Code edits
  (rename a variable, add type hints, add a docstring to a given function: the answer is the function
  again) and quoting (repeat the sentences of a given passage that mention a word, or the passage itself,
  then summarize it).
- open.jsonl: open-ended questions whose answers share little text with the prompt.

Both files are deterministic (fixed texts, no randomness), 32 prompts each, and the two kinds of
repetitive task alternate so that any prefix of the file mixes them.

    python3 bench/spec_datasets.py OUT_DIR
"""
import json
import os
import sys

# Small Python functions, 10-20 lines each; the model is asked to write them out again with an edit.
FUNCTIONS = [
    '''def moving_average(values, window):
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result''',
    '''def count_words(text):
    counts = {}
    for line in text.splitlines():
        for word in line.lower().split():
            word = word.strip(".,;:!?")
            if not word:
                continue
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])''',
    '''def binary_search(items, target):
    low = 0
    high = len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1''',
    '''def merge_intervals(intervals):
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged''',
    '''def parse_config(lines):
    config = {}
    section = "default"
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, value = line.split("=", 1)
        config.setdefault(section, {})[key.strip()] = value.strip()
    return config''',
    '''def flatten(nested):
    output = []
    stack = [nested]
    while stack:
        current = stack.pop()
        if isinstance(current, list):
            for element in reversed(current):
                stack.append(element)
        else:
            output.append(current)
    return output''',
    '''def rolling_max(numbers, size):
    window = []
    maxima = []
    for position, number in enumerate(numbers):
        while window and numbers[window[-1]] <= number:
            window.pop()
        window.append(position)
        if window[0] <= position - size:
            window.pop(0)
        if position >= size - 1:
            maxima.append(numbers[window[0]])
    return maxima''',
    '''def group_by_length(words):
    groups = {}
    for word in words:
        length = len(word)
        if length not in groups:
            groups[length] = []
        groups[length].append(word)
    for length in groups:
        groups[length].sort()
    return groups''',
]

# (function index, old name, new name) for the rename task.
RENAMES = [
    (0, "total", "running_sum"),
    (1, "counts", "frequencies"),
    (2, "middle", "mid"),
    (3, "merged", "result"),
    (4, "section", "current_section"),
    (5, "stack", "pending"),
    (6, "window", "candidates"),
    (7, "groups", "buckets"),
]

# Passages of plain prose, each with a word that several of its sentences mention.
PASSAGES = [
    ("river", "The river rises in the hills north of the town and runs south for about forty miles. "
     "In spring the river floods the low fields, which is why the old farmhouses stand on raised ground. "
     "A stone bridge crosses the river at the market square; it was built in 1712 and widened in 1890. "
     "Fishermen come in the autumn for the trout. The mill that once stood on the river bank is now a "
     "small museum, and its wheel still turns on the first Sunday of every month."),
    ("library", "The new library opened in March after two years of building work. It holds about "
     "eighty thousand books, a room of old maps, and a reading garden on the roof. Children can borrow "
     "up to ten books at a time. The library stays open until nine in the evening on weekdays, and on "
     "Saturdays it runs a repair cafe where volunteers fix lamps, bicycles and clothes. The old library "
     "building across the street will become a community theatre."),
    ("bread", "Bread has been baked in this village for as long as anyone can remember. The bakery on "
     "the corner starts its ovens at four in the morning. Its rye bread is made with a starter that the "
     "owner's grandmother kept alive through the war. On Fridays the bakery sells sweet buns with raisins, "
     "and they are usually gone by ten. People say the bread tastes better here because of the water, "
     "though the baker says it is only patience."),
    ("train", "The night train leaves the capital at ten past eleven and reaches the coast just after "
     "dawn. Its sleeping cars have four beds each, and the attendant brings tea at six. The train was "
     "nearly cancelled last year, but a petition with thirty thousand names kept it running. Most "
     "passengers are students and families going to the beaches. In winter the train carries skiers "
     "to the mountains instead, with a special car for their equipment."),
    ("garden", "Behind the school there is a garden that the pupils look after themselves. Each class "
     "has its own bed of vegetables, and the oldest pupils keep bees at the far end. Last summer the "
     "garden produced more tomatoes than the kitchen could use, so the children sold them at the gate. "
     "The money paid for a greenhouse. Teachers say the garden has taught the pupils more about "
     "patience than any lesson."),
    ("harbour", "The harbour is small, but it shelters boats from the worst of the western storms. "
     "Every morning the fishing boats come back to the harbour with their catch, and the auction begins "
     "at seven. Tourists watch from the sea wall. In the evenings the harbour lights are reflected in the "
     "still water, and the cafes along the quay stay open late. A new lifeboat station was built at the "
     "harbour mouth three years ago."),
    ("clock", "The clock on the town hall has stopped twice in its history. The first time was during "
     "the great frost of 1895, when the oil in its gears froze. The second time, a family of owls had "
     "built a nest behind the clock face. Today the clock is wound by hand every Monday by a retired "
     "teacher who has done the job for twenty years. Visitors can climb the tower to see the clock "
     "mechanism on summer afternoons."),
    ("market", "The Saturday market fills the main square from early morning until two in the "
     "afternoon. Farmers sell cheese, eggs, honey and vegetables, and there is a stall of second-hand "
     "books by the fountain. The market has run every week since the middle ages, except for a few "
     "months during an outbreak of plague. In December the market becomes a Christmas fair with music "
     "and hot wine. Prices at the market are often lower than in the supermarket."),
]

OPEN_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a democracy and a monarchy?",
    "Give me advice on how to prepare for a job interview.",
    "Describe what life might be like on a space station in the year 2200.",
    "Why do people enjoy listening to sad music?",
    "Explain how vaccines help the immune system, in simple terms.",
    "Write a letter to your future self, ten years from now.",
    "What would happen if the moon suddenly disappeared?",
    "Suggest a plan for a relaxing weekend in the countryside.",
    "What makes a good teacher? Give several qualities and explain each.",
    "Write a poem about autumn leaves.",
    "How can a small town attract more visitors without losing its character?",
    "Explain the causes of inflation to a high school student.",
    "Invent a new board game and describe its rules.",
    "What are the benefits and risks of social media for teenagers?",
    "Tell me about the history of the bicycle.",
    "Write a dialogue between a cat and a dog who have to share a house.",
    "How does a rainbow form?",
    "Give me ideas for a birthday party for a seven-year-old.",
    "What are some ways to reduce stress at work?",
    "Describe your ideal city and explain why it would be a good place to live.",
    "Why is sleep important for health?",
    "Write a short mystery story set on a train.",
    "What should someone consider before adopting a dog?",
    "Explain how a computer stores information.",
    "Describe the water cycle and why it matters for farming.",
    "Write a speech for the opening of a new public park.",
    "What are the advantages of learning a second language?",
    "Imagine you are a tree in a city. Describe your day.",
    "How can families save energy at home?",
    "Explain why the sky is blue.",
    "Write a recipe for a soup you have invented, with a story about how you came up with it.",
]


def repetitive_prompts():
    code, quote = [], []
    for i, (f, old, new) in enumerate(RENAMES):
        code.append(
            f"Rewrite the following Python function with the variable `{old}` renamed to `{new}`. "
            f"Output only the complete rewritten function.\n\n```python\n{FUNCTIONS[f]}\n```")
        code.append(
            "Add type hints to every parameter and to the return value of the following Python "
            f"function. Output only the complete function.\n\n```python\n{FUNCTIONS[(i + 3) % len(FUNCTIONS)]}\n```")
    for word, passage in PASSAGES:
        quote.append(
            f"Here is a passage:\n\n{passage}\n\nQuote, word for word, every sentence of the passage that "
            f"mentions the {word}, one per line. Then summarize the passage in one sentence.")
        quote.append(
            f"Repeat the following passage exactly, then write one sentence saying what it is about.\n\n"
            f"{passage}")
    # Alternate code and quoting so that any prefix of the file has both.
    out = []
    for c, q in zip(code, quote):
        out += [c, q]
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out_dir, exist_ok=True)
    for name, prompts in (("repetitive", repetitive_prompts()), ("open", OPEN_QUESTIONS)):
        assert len(prompts) == 32 and len(set(prompts)) == 32, name
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p}) + "\n")
        print(f"{path}: {len(prompts)} prompts", file=sys.stderr)


if __name__ == "__main__":
    main()
