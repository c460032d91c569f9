"""Offline data and tokenizer for the logit-distillation demo.

Nothing here touches the network. The demo needs two things that normally come
from the Hub, a chat dataset and a tokenizer, so this module makes both:

* ``make_conversations`` writes ShareGPT-style rows for a toy "name something"
  task. Each question has its own fixed categorical distribution over a handful
  of answers, and the answer in a row is *sampled* from it. The best possible
  model therefore predicts a spread-out distribution at the answer position,
  which is exactly the information a teacher's soft logits carry and a one-hot
  label does not. That is what makes distillation measurably better than plain
  SFT on this data.
* ``train_tokenizer`` trains a small byte-level BPE on the ChatML renderings and
  saves it so that ``AutoTokenizer.from_pretrained`` returns the same ids even
  when the folder also holds a ``qwen2`` or ``llama`` ``config.json`` (see the
  function's docstring for why that needs care in transformers 5).

Run as a script to write ``train.jsonl``, ``eval.jsonl`` and ``tokenizer/``::

    python3 examples/demo_data.py --out_dir /tmp/demo --n_train 4000 --n_eval 400
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
from typing import Iterable

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import CHATML_TEMPLATE, SHAREGPT_ROLES  # noqa: E402

# ---------------------------------------------------------------------------
# The task: questions with uncertain answers
# ---------------------------------------------------------------------------

# One canonical wording per question, so ``true_answer_distribution`` can be
# keyed by the exact prompt text. Answers are single words and distinct within
# a question so an answer can be recovered from a reply by word matching.
_QUESTIONS: dict[str, list[str]] = {
    "Name an animal that lives in the sea.": ["shark", "whale", "dolphin", "octopus", "seal", "squid", "crab", "jellyfish", "turtle", "eel"],
    "Pick a fruit that is red.": ["apple", "cherry", "strawberry", "raspberry", "tomato", "pomegranate", "watermelon", "cranberry"],
    "Give a word that rhymes with cat.": ["hat", "bat", "mat", "rat", "sat", "flat", "chat", "pat", "fat"],
    "Name a color of the rainbow.": ["red", "orange", "yellow", "green", "blue", "indigo", "violet"],
    "Pick a number between one and ten.": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "Name a planet in our solar system.": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "Name a farm animal.": ["cow", "pig", "sheep", "goat", "horse", "chicken", "duck", "donkey"],
    "Pick a vegetable that is green.": ["broccoli", "spinach", "peas", "lettuce", "cucumber", "kale", "celery", "zucchini", "cabbage"],
    "Name a musical instrument with strings.": ["guitar", "violin", "cello", "harp", "banjo", "bass", "ukulele", "viola", "mandolin"],
    "Give a word that rhymes with light.": ["night", "bright", "kite", "white", "sight", "fight", "might", "right", "bite", "flight"],
    "Name a sport played with a ball.": ["soccer", "tennis", "basketball", "baseball", "golf", "volleyball", "rugby", "cricket", "bowling"],
    "Name a bird that cannot fly.": ["penguin", "ostrich", "emu", "kiwi", "cassowary", "dodo"],
    "Pick a season of the year.": ["spring", "summer", "autumn", "winter", "fall"],
    "Name a day of the week.": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "Name something you find in a kitchen.": ["spoon", "fork", "knife", "pan", "pot", "oven", "kettle", "plate", "cup", "fridge"],
    "Give a word that rhymes with cake.": ["lake", "bake", "make", "take", "snake", "rake", "shake", "wake", "fake"],
    "Name a flower.": ["rose", "tulip", "daisy", "lily", "sunflower", "orchid", "daffodil", "poppy", "violet", "lavender"],
    "Name a type of tree.": ["oak", "pine", "maple", "birch", "willow", "cedar", "elm", "palm", "ash", "spruce"],
    "Pick a drink you might have at breakfast.": ["coffee", "tea", "juice", "milk", "water", "cocoa", "smoothie"],
    "Name a shape.": ["circle", "square", "triangle", "rectangle", "oval", "hexagon", "pentagon", "star", "diamond"],
    "Name a large city in Europe.": ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Warsaw", "Lisbon", "Prague", "Amsterdam"],
    "Name an insect.": ["ant", "bee", "beetle", "butterfly", "fly", "mosquito", "moth", "wasp", "ladybug", "grasshopper"],
    "Pick a word that means happy.": ["glad", "joyful", "cheerful", "content", "merry", "pleased", "delighted", "jolly"],
    "Pick a word that means big.": ["large", "huge", "giant", "vast", "enormous", "massive", "great", "immense"],
    "Name a vehicle with wheels.": ["car", "bus", "bicycle", "truck", "train", "tractor", "scooter", "van", "motorcycle"],
    "Name something that is cold.": ["ice", "snow", "frost", "glacier", "freezer", "iceberg"],
    "Name a part of your face.": ["nose", "eye", "mouth", "cheek", "chin", "lip", "eyebrow", "forehead"],
    "Give a word that rhymes with ring.": ["sing", "king", "wing", "thing", "bring", "spring", "swing", "sting", "string"],
    "Name a metal.": ["iron", "gold", "silver", "copper", "tin", "zinc", "lead", "aluminum", "nickel", "platinum"],
    "Name a tool in a toolbox.": ["hammer", "screwdriver", "wrench", "pliers", "saw", "drill", "tape", "level", "chisel"],
    "Pick a dessert.": ["cake", "pie", "pudding", "cookie", "brownie", "cupcake", "tart", "custard", "sorbet"],
    "Name a kind of weather.": ["rain", "snow", "sunshine", "wind", "fog", "hail", "storm", "sleet", "drizzle"],
    "Name a board game.": ["chess", "checkers", "Monopoly", "Scrabble", "Go", "backgammon", "Clue", "Risk"],
    "Name a pet that people keep at home.": ["dog", "cat", "hamster", "rabbit", "parrot", "goldfish", "turtle", "mouse", "ferret", "canary"],
    "Name a language spoken in Europe.": ["English", "French", "German", "Spanish", "Italian", "Polish", "Dutch", "Greek", "Swedish", "Portuguese"],
    "Name a piece of clothing.": ["shirt", "jacket", "hat", "sock", "shoe", "scarf", "coat", "sweater", "dress", "skirt"],
    "Give a word that rhymes with moon.": ["soon", "spoon", "tune", "June", "noon", "balloon", "dune", "loon"],
    "Name a breakfast food.": ["eggs", "toast", "cereal", "pancakes", "bacon", "oatmeal", "waffles", "yogurt", "muffin"],
    "Name a gemstone.": ["diamond", "ruby", "emerald", "sapphire", "opal", "topaz", "pearl", "amethyst", "garnet"],
    "Name a room in a house.": ["kitchen", "bedroom", "bathroom", "attic", "basement", "hall", "garage", "study", "pantry", "den"],
    "Name a big cat.": ["lion", "tiger", "leopard", "jaguar", "cheetah", "cougar", "panther", "lynx"],
    "Name a kind of bread.": ["baguette", "bagel", "brioche", "sourdough", "rye", "pita", "naan", "ciabatta", "focaccia"],
    "Name a thing you can read.": ["book", "magazine", "newspaper", "letter", "poem", "map", "sign", "menu", "comic"],
    "Pick a word that means fast.": ["quick", "rapid", "swift", "speedy", "brisk", "hasty", "fleet"],
    "Name an ocean.": ["Pacific", "Atlantic", "Indian", "Arctic", "Southern"],
    "Name a continent.": ["Asia", "Africa", "Europe", "Australia", "Antarctica"],
    "Name a sound an animal makes.": ["moo", "woof", "meow", "oink", "quack", "baa", "neigh", "hiss", "roar", "tweet"],
    "Name a kind of cheese.": ["cheddar", "brie", "gouda", "feta", "mozzarella", "parmesan", "camembert", "stilton", "emmental"],
    "Name a job at a hospital.": ["doctor", "nurse", "surgeon", "porter", "cleaner", "pharmacist", "paramedic", "receptionist"],
    "Name a nut.": ["almond", "walnut", "peanut", "cashew", "pecan", "hazelnut", "pistachio", "chestnut"],
    "Pick a herb used in cooking.": ["basil", "thyme", "parsley", "mint", "rosemary", "oregano", "sage", "dill", "coriander", "chives"],
    "Name something that glows in the dark.": ["firefly", "moon", "star", "candle", "lamp", "screen", "lantern"],
    "Name a thing you take to the beach.": ["towel", "umbrella", "sunscreen", "bucket", "spade", "ball", "hat", "sandals", "book"],
    "Give a word that rhymes with rain.": ["train", "plain", "chain", "brain", "main", "gain", "lane", "cane", "pain", "grain"],
    "Name a snake.": ["cobra", "python", "viper", "adder", "mamba", "boa", "rattlesnake", "anaconda"],
    "Name a kind of boat.": ["canoe", "kayak", "yacht", "ferry", "raft", "sailboat", "tugboat", "barge", "dinghy"],
    "Name a bone in the body.": ["skull", "rib", "femur", "spine", "jaw", "pelvis", "tibia", "humerus", "collarbone"],
    "Pick a word that means small.": ["tiny", "little", "mini", "petite", "wee", "slight", "minute", "compact"],
    "Name a citrus fruit.": ["orange", "lemon", "lime", "grapefruit", "tangerine", "clementine", "mandarin", "kumquat"],
    "Name a mountain range.": ["Alps", "Andes", "Himalayas", "Rockies", "Pyrenees", "Urals", "Atlas", "Appalachians"],
}

PROMPTS: list[str] = list(_QUESTIONS)

# Fixed on purpose and unrelated to the ``seed`` argument of make_conversations:
# train and eval sets drawn with different seeds must share one ground truth.
_DISTRIBUTION_SEED = "demo-data-answer-distributions-v1"

# The answer is the only uncertain part of a reply; the wrapper varies so the
# model cannot learn the answer position as a constant offset. None of these
# words is an answer, which keeps ``extract_answer`` unambiguous.
_REPLY_TEMPLATES = [
    "{A}.",
    "{A}!",
    "I would say {a}.",
    "{A}, I think.",
    "How about {a}?",
    "My pick is {a}.",
    "Probably {a}.",
    "I'll pick {a}.",
]
_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer in a few words.",
    "You are a friendly quiz partner.",
    "Keep answers short.",
]
# Lead-ins for the second question of a multi-turn row.
_FOLLOW_UP_PREFIXES = ["", "Thanks! ", "Next one. ", "Good. Now: "]

_P_SYSTEM = 0.4
_P_MULTI_TURN = 0.3

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# <|endoftext|> is both eos and pad. It never occurs inside a ChatML rendering,
# so masking pad positions out of the loss can never hide a real target, while
# <|im_end|> (which closes every assistant turn) stays a normal, supervised
# label. This matches the Qwen2 base-model convention.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"


# The template the demo renders with is the project's own (data.CHATML_TEMPLATE).


def _build_distributions() -> dict[str, dict[str, float]]:
    """Draw one Dirichlet-like distribution per question from a fixed RNG."""
    dists: dict[str, dict[str, float]] = {}
    for prompt, answers in _QUESTIONS.items():
        # A string seed is hashed with sha512 by ``random``, so this is stable
        # across processes and independent of PYTHONHASHSEED and question order.
        rng = random.Random(f"{_DISTRIBUTION_SEED}:{prompt}")
        # Per-question concentration: some questions get a clear favourite,
        # others are nearly flat, so soft targets vary in entropy.
        alpha = rng.uniform(0.5, 2.0)
        # The floor keeps every listed answer actually reachable in data.
        weights = [max(rng.gammavariate(alpha, 1.0), 0.02) for _ in answers]
        total = sum(weights)
        dists[prompt] = {a: w / total for a, w in zip(answers, weights)}
    return dists


_DISTRIBUTIONS = _build_distributions()


def true_answer_distribution(prompt: str) -> dict[str, float]:
    """Return the ground-truth answer distribution for a canonical prompt.

    ``prompt`` must be one of ``PROMPTS`` (a follow-up prefix such as
    ``"Thanks! "`` is stripped first). Raises ``KeyError`` otherwise.
    """
    return dict(_DISTRIBUTIONS[_canonical_prompt(prompt)])


def _canonical_prompt(text: str) -> str:
    if text in _DISTRIBUTIONS:
        return text
    for prefix in _FOLLOW_UP_PREFIXES:
        if prefix and text.startswith(prefix) and text[len(prefix):] in _DISTRIBUTIONS:
            return text[len(prefix):]
    raise KeyError(f"not a demo prompt: {text!r}")


def extract_answer(prompt: str, reply: str) -> str | None:
    """Return the answer to ``prompt`` contained in ``reply``, or None.

    Matching is case-insensitive on whole words; a reply mentioning two
    answers (never produced by this module) also yields None.
    """
    found = [
        a for a in _QUESTIONS[_canonical_prompt(prompt)]
        if re.search(rf"\b{re.escape(a)}\b", reply, flags=re.IGNORECASE)
    ]
    return found[0] if len(found) == 1 else None


def _sample_exchange(rng: random.Random, prompt: str, prefix: str = "") -> list[dict]:
    dist = _DISTRIBUTIONS[prompt]
    answer = rng.choices(list(dist), weights=list(dist.values()))[0]
    template = rng.choice(_REPLY_TEMPLATES)
    reply = template.format(a=answer, A=answer[:1].upper() + answer[1:])
    return [
        {"from": "human", "value": prefix + prompt},
        {"from": "gpt", "value": reply},
    ]


def make_conversations(n: int, seed: int) -> list[dict]:
    """Make ``n`` ShareGPT rows ``{"conversations": [{"from", "value"}, ...]}``.

    About 40% of rows open with a system turn and about 30% hold two
    human/gpt exchanges on different questions; the rest are one exchange.
    Each answer is drawn from ``true_answer_distribution`` of its question.
    Output depends only on ``n`` and ``seed``, and the first ``k`` rows for a
    seed do not depend on ``n``.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns: list[dict] = []
        if rng.random() < _P_SYSTEM:
            turns.append({"from": "system", "value": rng.choice(_SYSTEM_PROMPTS)})
        if rng.random() < _P_MULTI_TURN:
            first, second = rng.sample(PROMPTS, 2)
            turns += _sample_exchange(rng, first)
            turns += _sample_exchange(rng, second, prefix=rng.choice(_FOLLOW_UP_PREFIXES))
        else:
            turns += _sample_exchange(rng, rng.choice(PROMPTS))
        rows.append({"conversations": turns})
    return rows


def write_jsonl(rows: Iterable[dict], path: str) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def render_chatml(conversations: list[dict]) -> str:
    """Render ShareGPT turns as ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` each.

    Identical to ``tokenizer.apply_chat_template(messages, tokenize=False)``
    with the template saved by ``train_tokenizer``.
    """
    return "".join(
        f"<|im_start|>{SHAREGPT_ROLES[t['from']]}\n{t['value']}<|im_end|>\n" for t in conversations
    )


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _qwen2_pipeline():
    """Normalizer, pre-tokenizer and decoder that ``Qwen2Tokenizer`` builds itself.

    Taken from a live ``Qwen2Tokenizer`` rather than re-declared, so they are
    by construction the ones transformers will impose when it reloads the
    tokenizer next to a qwen2 config (see ``train_tokenizer``).
    """
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    backend = Qwen2Tokenizer().backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer, backend.decoder


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on ``texts`` and save it with ``save_pretrained``.

    Specials: ``<|endoftext|>`` (id 0; eos and pad), ``<|im_start|>`` (1),
    ``<|im_end|>`` (2). All 256 byte symbols are in the base alphabet, so any
    string (accents, CJK) encodes without an unknown token, and
    ``return_offsets_mapping=True`` gives character offsets into the input.

    Why the pipeline is Qwen2's and ``tokenizer_class`` is pinned: in
    transformers 5 ``AutoTokenizer.from_pretrained(dir)`` reads ``config.json``
    first. ``qwen2`` is in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``, so for
    a qwen2 config it ignores the saved ``tokenizer_class`` and instantiates
    ``Qwen2Tokenizer``, which keeps vocab, merges and post-processor from
    ``tokenizer.json`` and rebuilds NFC + its own split regex + ByteLevel
    around them. A tokenizer trained with any other pre-tokenization would
    silently change ids on reload. Training with exactly that pipeline makes
    the rebuild a no-op. For other config types the saved
    ``tokenizer_class: TokenizersBackend`` is trusted and ``tokenizer.json`` is
    loaded verbatim (llama has no tokenizer mapping entry in 5.23 at all; in
    releases that map it to ``LlamaTokenizer``, whose rebuild is Metaspace, a
    missing ``tokenizer_class`` would let the config pick that class).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer, decoder = _qwen2_pipeline()
    tok = Tokenizer(models.BPE())  # no unk token: byte-level needs none
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Same as Qwen2Tokenizer's default, so both loaders agree on it too.
        unk_token=EOS_TOKEN,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(out_dir)

    # save_pretrained writes the class name itself today; pin it anyway,
    # since the auto loader's choice hinges on this one field.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "TokenizersBackend"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------
# Script entry point
# ---------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=4000)
    p.add_argument("--n_eval", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab_size", type=int, default=512)
    args = p.parse_args()

    train = make_conversations(args.n_train, seed=args.seed)
    # A far-away seed so eval rows are a fresh draw from the same distributions.
    evaluation = make_conversations(args.n_eval, seed=args.seed + 1_000_003)
    write_jsonl(train, os.path.join(args.out_dir, "train.jsonl"))
    write_jsonl(evaluation, os.path.join(args.out_dir, "eval.jsonl"))

    tok_dir = os.path.join(args.out_dir, "tokenizer")
    train_tokenizer([render_chatml(r["conversations"]) for r in train], tok_dir, args.vocab_size)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    lengths = [len(tok(render_chatml(r["conversations"]))["input_ids"]) for r in evaluation]
    print(
        f"wrote {len(train)} train / {len(evaluation)} eval rows and a {len(tok)}-token tokenizer "
        f"to {args.out_dir}; eval tokens per conversation: median {statistics.median(lengths)}, "
        f"max {max(lengths)}"
    )


if __name__ == "__main__":
    main()
